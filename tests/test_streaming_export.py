"""The builder's streaming export (each weight read, quantized and written to external data in turn) computes
exactly what quantizing the whole fp32 graph afterwards computes, and holds a layer, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from ortspec.export.builder import GraphBuilder, build_onnx
from ortspec.export.builder.external import ExternalData, save_graph
from ortspec.export.builder.safetensors_io import SafetensorsCheckpoint
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.quantize import dequantized_weight, quantize_weights
from ortspec.export.quantize.streaming import StreamingQuantizer
from ortspec.runtime.package import graph_names as names

from helpers.gguf_files import write_gguf


def run(path: Path, ids: list[int]) -> list[np.ndarray]:
    """logits and hidden_states of a prompt through the graph at `path` (an empty cache of 32 positions)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {
        names.INPUT_IDS: np.array([ids], np.int64),
        names.SEQLENS_K: np.array([len(ids) - 1], np.int32),
        names.TOTAL_SEQUENCE_LENGTH: np.array(len(ids), np.int32),
        names.LOGITS_TO_KEEP: np.array([0], np.int64),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros([1, value.shape[1], 32, value.shape[3]], np.float32)
    return session.run([names.LOGITS, names.HIDDEN_STATES], feeds)


def both_ways(source: Path, tmp_path: Path, bits: int, keep: bool, embedding: bool) -> tuple[Path, Path, dict, dict]:
    checkpoint = resolve_checkpoint(source)
    whole, _, _ = build_onnx(checkpoint.path, checkpoint.config)
    whole, summary = quantize_weights(whole, bits, 32, 4, keep)
    onnx.save_model(whole, tmp_path / "whole.onnx")
    streamed = tmp_path / "streamed" / "model.onnx"
    data, quantizer = ExternalData(streamed), StreamingQuantizer(bits, 32, 4, keep, embedding)
    model, _, _ = build_onnx(checkpoint.path, checkpoint.config, (), GraphBuilder(data, quantizer))
    save_graph(model, streamed, data)
    return tmp_path / "whole.onnx", streamed, summary, quantizer.summary()


@pytest.mark.parametrize(
    "weights, variant, bits, keep, embedding",
    [
        ("hf", "", 4, True, False),  # an untied table quantized from fp32 differs: kept fp32 here, as before
        ("hf", "tied", 8, True, True),
        ("F32", "tied", 4, True, True),
        ("Q4_0", "", 4, True, True),  # an untied Q4_0 table is stored exactly
        ("Q4_1", "tied", 4, True, True),
        ("Q4_1", "", 4, True, True),
        ("Q4_1", "", 4, False, False),
        ("Q8_0", "tied", 4, True, True),
    ],
)
def test_streaming_export_equals_whole_graph_quantization(
    weights, variant, bits, keep, embedding, checkpoint, tmp_path
):
    source = checkpoint("llama", variant=variant)
    if weights != "hf":
        source = write_gguf(source, tmp_path / "model.gguf", weights=weights)
    whole, streamed, whole_summary, streamed_summary = both_ways(source, tmp_path, bits, keep, embedding)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, size=12)]
    for expected, got in zip(run(whole, ids), run(streamed, ids), strict=True):
        np.testing.assert_array_equal(got, expected)
    for key in ("quantized_nodes", "lossless_nodes", "lossless_offset_nodes", "lossless_8bit_nodes"):
        assert streamed_summary[key] == whole_summary[key], key
    if variant == "tied" or not embedding:
        assert streamed_summary["embedding"] == whole_summary["embedding"]
    else:  # the untied table is stored as blocks too: the streamed graph holds no fp32 copy of it
        assert streamed_summary["embedding"].startswith("int") and whole_summary["embedding"] == "fp32 Gather"
        assert streamed.stat().st_size + (streamed.parent / "model.onnx.data").stat().st_size < whole.stat().st_size


def test_untied_embedding_is_quantized_like_the_lm_head(checkpoint, tmp_path):
    """An fp32 untied table becomes int4 blocks along its rows, each value within a step of the table's (symmetric
    codes -8..7 with the step absmax / 8: the largest positive value is clipped to 7 steps)."""
    source = resolve_checkpoint(checkpoint("llama"))
    path = tmp_path / "model.onnx"
    data = ExternalData(path)
    model, _, _ = build_onnx(source.path, source.config, (), GraphBuilder(data, StreamingQuantizer(4)))
    save_graph(model, path, data)
    assert "GatherBlockQuantized" in {node.op_type for node in model.graph.node}
    stored = {init.name: init for init in onnx.load(str(path)).graph.initializer}
    assert "embed_tokens.weight" not in stored
    table = SafetensorsCheckpoint(source.path).get("model.embed_tokens.weight")
    vocab, hidden = table.shape
    as_matmul = helper.make_node("MatMulNBits", ["x", "embed_tokens_Q4", "embed_tokens_scales"], ["y"], K=hidden,
                                 N=vocab, bits=4)  # fmt: skip
    rows = dequantized_weight(as_matmul, stored).T
    step = np.abs(numpy_helper.to_array(stored["embed_tokens_scales"])).repeat(32, axis=1)
    assert np.all(np.abs(rows - table) <= step * 1.0001) and np.abs(rows - table).mean() < step.mean() / 3


PEAK_SCRIPT = """
import resource, sys
import onnxruntime.quantization.matmul_nbits_quantizer
from ortspec.export import export_pair
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_pair(sys.argv[1], sys.argv[2], quantize="int4", report=lambda _: None)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_streaming_export_holds_a_layer_not_the_model(tmp_path):
    """A 24-layer checkpoint of ~200 MB exports with the peak RSS growing by well under its size."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from scale import write_checkpoint

    shape = dict(hidden=512, layers=24, heads=8, kv_heads=8, intermediate=1024, vocab=384, tied=True)
    ckpt = write_checkpoint(tmp_path / "ckpt", shape)
    size = (ckpt / "model.safetensors").stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(ckpt), str(tmp_path / "pkg")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = (int(v) * 1024 for v in done.stdout.split())
    assert size > 150e6
    assert after - before < size / 3, f"peak RSS grew by {after - before} bytes exporting {size} bytes"
    assert json.loads((tmp_path / "pkg" / "manifest.json").read_text())["target"]["quantization"]["bits"] == 4


class Constants:
    """The graph builder's side the quantizer writes to, keeping the arrays."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.arrays: dict[str, np.ndarray] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.arrays[name] = array
        return name


@pytest.mark.parametrize("kind", ["quantized", "exact", "exact-offset"])
def test_a_large_table_quantized_in_slices_gives_the_same_blocks(kind, monkeypatch):
    from ortspec.export.quantize import streaming

    rng = np.random.default_rng(0)
    k, n = 64, 200
    d = rng.uniform(1e-3, 1e-2, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.1, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    codes[..., 0], codes[..., 1] = 0, 15  # each block spans all codes
    weight = (
        {
            "quantized": rng.standard_normal((n, k), dtype=np.float32),
            "exact": d * (codes - 8),  # Q4_0 blocks
            "exact-offset": d * codes + m,  # Q4_1 blocks (d * q + m)
        }[kind]
        .reshape(n, k)
        .T
    )  # a [K, N] view of an [N, K] table, as the builder passes an embedding
    whole, sliced = Constants(), Constants()
    expected = StreamingQuantizer(4).store(whole, "w", weight)
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", k * 48)  # slices of 48 columns, the last one of 8
    got = StreamingQuantizer(4).store(sliced, "w", weight)
    assert got == expected and got.kind == kind
    assert whole.arrays.keys() == sliced.arrays.keys()
    for name, array in whole.arrays.items():
        np.testing.assert_array_equal(sliced.arrays[name], array)


@pytest.mark.parametrize("weights", ["hf", "hf-bf16", "Q4_1", "Q8_0"])
def test_a_table_read_in_row_ranges_gives_the_whole_reads_rows_and_blocks(weights, checkpoint, tmp_path, monkeypatch):
    """`rows` (safetensors offsets, GGUF tensor data) reads what `get` reads, bit for bit, and the quantizer fed
    a table a range at a time from its file writes the blocks it writes from the whole table."""
    from ortspec.export.builder.gguf_io import GGUFCheckpoint
    from ortspec.export.builder.weights import TableColumns
    from ortspec.export.quantize import streaming

    source = checkpoint("llama", variant="tied")
    if weights == "hf-bf16":
        table = SafetensorsCheckpoint(source).get("model.embed_tokens.weight")
        bf16 = (table.view(np.uint32) >> 16).astype(np.uint16)
        (tmp_path / "bf16").mkdir()
        safetensors_numpy().save_file({"model.embed_tokens.weight": bf16}, str(tmp_path / "bf16" / "model.safetensors"))
        header = (tmp_path / "bf16" / "model.safetensors").read_bytes()
        assert b'"U16"' in header  # numpy has no bfloat16: mark the entry as BF16, the same bytes
        (tmp_path / "bf16" / "model.safetensors").write_bytes(header.replace(b'"U16"', b'"BF16"', 1))
        ckpt = SafetensorsCheckpoint(tmp_path / "bf16")
    elif weights == "hf":
        ckpt = SafetensorsCheckpoint(source)
    else:
        ckpt = GGUFCheckpoint(write_gguf(source, tmp_path / "model.gguf", weights=weights))
    name = "model.embed_tokens.weight"
    whole = ckpt.get(name)
    for start, stop in [(0, 1), (5, 67), (0, whole.shape[0]), (whole.shape[0] - 3, whole.shape[0]), (9, 9)]:
        got = ckpt.rows(name, start, stop)
        assert got.dtype == whole.dtype and got.tobytes() == whole[start:stop].tobytes(), (start, stop)
    with pytest.raises(ValueError, match="has no rows"):
        ckpt.rows(name, 3, whole.shape[0] + 1)
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", whole.shape[1] * 48)  # slices of 48 rows
    expected, sliced = Constants(), Constants()
    assert StreamingQuantizer(4).store(expected, "w", whole.T) == StreamingQuantizer(4).store(
        sliced, "w", TableColumns(ckpt, name)
    )
    assert expected.arrays.keys() == sliced.arrays.keys()
    for key, array in expected.arrays.items():
        assert sliced.arrays[key].tobytes() == array.tobytes(), key


def safetensors_numpy():
    import safetensors.numpy

    return safetensors.numpy


def test_a_large_table_is_quantized_holding_a_slice_not_the_table(tmp_path, monkeypatch):
    """Quantizing a table read a range of rows at a time allocates (tracemalloc) a fraction of the table; reading
    it whole first would allocate the table itself."""
    import tracemalloc

    from ortspec.export.builder.weights import TableColumns
    from ortspec.export.quantize import streaming

    vocab, hidden = 16384, 256  # 16 MB of fp32
    table = np.random.default_rng(0).standard_normal((vocab, hidden), dtype=np.float32)
    safetensors_numpy().save_file({"model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    del table
    ckpt = SafetensorsCheckpoint(tmp_path)
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", hidden * 512)  # 512 KB slices
    peaks = []
    name = "model.embed_tokens.weight"
    for weight in (lambda: TableColumns(ckpt, name), lambda: ckpt.get(name).T):
        tracemalloc.start()
        q = StreamingQuantizer(4).store(Constants(), "w", weight())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert q.kind == "quantized" and (q.k, q.n) == (hidden, vocab)
    table_bytes = vocab * hidden * 4
    assert peaks[1] > table_bytes  # the measure sees a whole table
    assert peaks[0] < table_bytes / 3, f"quantizing by ranges allocated {peaks[0]} bytes for a {table_bytes}-byte table"
