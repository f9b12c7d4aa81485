"""Hostile and broken GGUF files: each is refused in one line naming the file and the key or tensor, quickly and
without allocating what its header claims."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFWriter

from ortspec.cli import main as cli
from ortspec.export import export_pair
from ortspec.export.builder.gguf_file import GGUFFile
from ortspec.export.builder.gguf_io import GGUFModel
from ortspec.export.checkpoint import resolve_checkpoint

from helpers.gguf_files import write_gguf

HIDDEN, FF, HEADS, KV_HEADS, VOCAB = 32, 64, 4, 2, 64
U32, STRING, ARRAY, U64 = 4, 8, 9, 10


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def header(entries: list[bytes] = (), tensors: list[bytes] = (), version: int = 3, tensor_count: int | None = None):
    """A GGUF header: metadata `entries`, then the tensor table `tensors` (`tensor_count` claims another count)."""
    count = len(tensors) if tensor_count is None else tensor_count
    return b"GGUF" + struct.pack("<IQQ", version, count, len(entries)) + b"".join(entries) + b"".join(tensors)


def entry(key: str, kind: int, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + value


def tensor_entry(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def tiny_llama(path: Path, metadata: dict | None = None, drop: tuple[str, ...] = (), shapes: dict | None = None):
    """A valid 2-layer llama GGUF (F32, no tokenizer); `metadata` overrides keys (None removes one), `drop` leaves
    tensors out, `shapes` writes tensors of other shapes."""
    values = {
        "llama.context_length": 128,
        "llama.embedding_length": HIDDEN,
        "llama.block_count": 2,
        "llama.feed_forward_length": FF,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "general.name": "tiny",
    } | (metadata or {})
    writer = GGUFWriter(str(path), "llama")
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif value is not None:
            writer.add_uint32(key, value)
    head_dim, rng = HIDDEN // HEADS, np.random.default_rng(0)
    tensors = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(2):
        tensors |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * head_dim),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FF, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FF, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FF),
        }
    tensors |= shapes or {}
    for name, shape in tensors.items():
        if name not in drop:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def refusal(path: Path) -> str:
    """The one-line refusal of opening `path` as a checkpoint, checked to be bounded in memory."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as caught:
            resolve_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "\n" not in message and path.name in message, message
    assert peak < 64 << 20, f"refusing {path.name} allocated {peak} bytes"
    return message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"GGUF\x03\x00", "too short for a GGUF header"),
        (b"GGML" + bytes(40), "does not start with the GGUF magic"),
        (header(version=1), "GGUF version 1"),
        (header(tensor_count=1 << 40), "claims 1099511627776 tensors"),
        (header([entry("general.name", STRING, struct.pack("<Q", 1 << 40))]), "general.name claims 1099511627776"),
        (header([entry("general.name", STRING, string("x" * 10)[:12])]), "metadata general.name needs 10 bytes"),
        (
            header([entry("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 62))]),
            "tokenizer.ggml.tokens claims an array of 4611686018427387904 items",
        ),
        (
            header([entry("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, 1 << 20))]),
            "the 1048576 items of metadata tokenizer.ggml.scores needs 4194304 bytes",
        ),
        (header([entry("x", ARRAY, struct.pack("<IQ", ARRAY, 1))]), "metadata x is an array of nested arrays"),
        (header([entry("x", 77, b"")]), "metadata x has unknown value type 77"),
        (header([entry("a", U32, bytes(4)), entry("a", U32, bytes(4))]), "metadata a appears twice"),
        (header([entry("general.name", STRING, string(b"\xff\xfe"))]), "metadata general.name is not UTF-8"),
        (header(tensors=[tensor_entry("w", [1 << 62, 1 << 62])]), "tensor w has dimensions"),
        (header(tensors=[tensor_entry("w", [])]), "tensor w has 0 dimensions"),
        (header(tensors=[tensor_entry("w", [4], ggml_type=999)]), "tensor w has unknown GGML type 999"),
        (header(tensors=[tensor_entry("w", [40], ggml_type=2)]), "tensor w (Q4_0) has rows of 40"),
        (
            header(tensors=[tensor_entry("w", [1 << 20])]),
            "w claims 4194304 bytes at data offset 0, past the end",
        ),
        (header(tensors=[tensor_entry("w", [4], offset=3)]) + bytes(64), "off its 32-byte alignment"),
        (
            header([entry("general.alignment", U32, struct.pack("<I", 48))], [tensor_entry("w", [4])]) + bytes(64),
            "general.alignment is 48, not a power of two",
        ),
    ],
    ids=lambda value: "" if isinstance(value, bytes) else value[:40],
)
def test_malformed_header_is_refused_in_one_line(content, expected, tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    assert expected in refusal(path)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"metadata": {"llama.block_count": None}}, "has no metadata llama.block_count"),
        ({"metadata": {"llama.block_count": 0}}, "metadata llama.block_count is 0, not an integer from 1"),
        ({"metadata": {"llama.block_count": 3}}, "has no tensor blk.2.attn_norm.weight"),
        ({"metadata": {"llama.block_count": 1}}, "tensor blk.1.attn_norm.weight lies beyond block_count 1"),
        ({"metadata": {"llama.attention.head_count": 0}}, "metadata llama.attention.head_count is 0"),
        ({"metadata": {"llama.attention.head_count_kv": 3}}, "4 attention heads do not divide into 3"),
        ({"metadata": {"llama.embedding_length": 0}}, "metadata llama.embedding_length is 0"),
        ({"metadata": {"llama.embedding_length": 48}}, "token_embd.weight has shape [64, 32], expected [64, 48]"),
        ({"metadata": {"llama.context_length": 0}}, "metadata llama.context_length is 0"),
        ({"metadata": {"llama.feed_forward_length": "many"}}, "metadata llama.feed_forward_length is many"),
        ({"metadata": {"general.name": "x" * 5000}}, "metadata general.name is 5000 characters long"),
        ({"drop": ("blk.1.ffn_down.weight",)}, "has no tensor blk.1.ffn_down.weight"),
        ({"drop": ("output_norm.weight",)}, "has no tensor output_norm.weight"),
        ({"shapes": {"blk.0.attn_k.weight": (HIDDEN, HIDDEN)}}, "tensor blk.0.attn_k.weight has shape [32, 32]"),
        ({"shapes": {"blk.5.attn_norm.weight": (HIDDEN,)}}, "tensor blk.5.attn_norm.weight lies beyond block_count"),
    ],
    ids=str,
)
def test_bad_model_metadata_is_refused_in_one_line(change, expected, tmp_path):
    assert expected in refusal(tiny_llama(tmp_path / "broken.gguf", **change))


def test_truncated_tensor_data_is_refused(tmp_path):
    path = tiny_llama(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    assert "tensor blk.1.ffn_down.weight claims 8192 bytes" in refusal(path)


def test_valid_tiny_file_parses_and_reads_its_data(tmp_path):
    path = tiny_llama(tmp_path / "ok.gguf")
    model = GGUFModel(path)
    assert model.config()["num_hidden_layers"] == 2
    data = GGUFFile(path).data("blk.0.ffn_down.weight")
    assert data.shape == (HIDDEN, FF * 4)
    assert model.dequantized("blk.0.ffn_down.weight").shape == (HIDDEN, FF)


def test_a_string_array_is_held_as_bytes_and_decoded_when_read(tmp_path):
    """A vocabulary's strings are checked when the header is parsed, kept as their bytes (not one Python string
    each: ~55 bytes apiece) and decoded when read; an item that is not UTF-8 is refused when read, in one line."""
    from ortspec.export.builder.gguf_file import GGUFError

    items = [f"t{i}" for i in range(200_000)] + ["é", ""]
    array = struct.pack("<IQ", STRING, len(items)) + b"".join(map(string, items))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(header([entry("tokenizer.ggml.tokens", ARRAY, array)]))
    tracemalloc.start()
    try:
        parsed = GGUFFile(path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = parsed.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == len(items) and tokens[7] == "t7" and tokens[-2] == "é" and tokens[-1] == ""
    assert tokens[:3] == items[:3] and tokens == items and list(tokens) == items
    assert held < 2 * path.stat().st_size, f"{len(items)} strings of {path.stat().st_size} bytes held {held} bytes"
    with pytest.raises(IndexError):
        tokens[len(items)]
    bad = header([entry("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2) + string("a") + string(b"\xff"))])
    path.write_bytes(bad)
    tokens = GGUFFile(path).metadata["tokenizer.ggml.tokens"]
    assert tokens[0] == "a"
    with pytest.raises(GGUFError, match=r"vocab.gguf: metadata tokenizer.ggml.tokens: item 1 is not UTF-8"):
        tokens[1]


def test_cli_refuses_a_hostile_gguf_in_one_line(tmp_path):
    path = tmp_path / "huge-array.gguf"
    path.write_bytes(header([entry("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 62))]))
    result = CliRunner().invoke(cli, ["export", str(path), "--out", str(tmp_path / "pkg")])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "claims an array of 4611686018427387904 items" in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()


def test_export_refuses_what_the_loader_would(checkpoint, tmp_path, monkeypatch):
    """A package whose manifest the loader would refuse is never published."""
    from ortspec.export import pair

    def bad_describe(*args, **kwargs):
        return pair.dataclasses.replace(real_describe(*args, **kwargs), max_positions=0)

    real_describe = pair.describe_model
    monkeypatch.setattr(pair, "describe_model", bad_describe)
    path = write_gguf(checkpoint("llama"), tmp_path / "ok.gguf")
    with pytest.raises(ValueError, match=r"would not load: .*max_positions"):
        export_pair(path, tmp_path / "pkg", quantize="none", report=lambda _: None)
    assert not (tmp_path / "pkg").exists()
