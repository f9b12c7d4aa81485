"""GGUF input: config, weights (dequantized, llama q/k un-permuted) and tokenizer read without torch, exported
by the builder; logits match PyTorch, encodings match transformers' own GGUF conversion."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from gguf import GGUFWriter, TokenType
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import ortspec
from ortspec.cli import main as cli
from ortspec.export import export_pair
from ortspec.export.builder import UnsupportedModelError
from ortspec.export.builder.gguf_io import open_gguf
from ortspec.export.gguf_tokenizer import UnsupportedTokenizerError, merges_from_scores
from ortspec.export.quantize.gguf_blocks import offset_blocks
from ortspec.models.random import CORPUS
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.text.tokenizer import TextTokenizer

from helpers.gguf_files import CHAT_TEMPLATE, projection_weights, write_gguf
from helpers.reference import hf_model

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()",
    "  leading spaces,\ttabs\nand newlines\r\n\n\n   trailing   ",
    "Ünïcödé: 日本語, emoji 🙂, accents éàü, ﬁ ligature, e\u0301 combining",
    "<|endoftext|>user\nhello<|pad|>\n<|endoftext|>assistant\n",
    "x<|endoftext|>y <|endoftext|> z",
    "",
    " ",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)  # 2024-11-27",
]


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    """gguf_file(family, weights, variant, kind, **write options) -> a .gguf written from the suite's checkpoint."""
    made: dict[tuple, Path] = {}

    def get(family="llama", weights="F32", variant="", kind="target", **options) -> Path:
        key = (family, weights, variant, kind, tuple(sorted(options.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("gguf") / f"{family}-{weights}-{variant or 'base'}-{kind}.gguf"
            made[key] = write_gguf(checkpoint(family, kind, variant), path, weights=weights, **options)
        return made[key]

    return get


def export(gguf: Path, out: Path, **options) -> ortspec.Pipeline:
    export_pair(gguf, out, quantize=options.pop("quantize", "none"), report=lambda _: None, **options)
    return ortspec.load(out)


def transformers_from_gguf(path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def assert_logits_match(pipe, model) -> None:
    """Prefill then single steps through our package vs one PyTorch forward over the same ids."""
    import torch

    ids = [int(i) for i in np.random.default_rng(0).integers(2, pipe.target.vocab_size, size=20)]
    with torch.no_grad():
        expected = model.eval()(torch.tensor([ids])).logits[0].float().numpy()
    target = DecoderState(pipe.target)
    got = [target.forward(ids[:12])] + [target.forward([t]) for t in ids[12:]]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4, rtol=0)


# (family, GGUF weight type, checkpoint variant, reference): "checkpoint" compares with the HF checkpoint
# the GGUF was written from (exact for F32: tests the un-permutation and rope_freqs independently of
# transformers' GGUF reader); "gguf" with transformers loading the same (dequantized) GGUF.
LOGIT_CASES = [
    ("llama", "F32", "", "checkpoint"),
    ("llama", "F32", "llama3-rope", "checkpoint"),
    ("llama", "Q8_0", "", "gguf"),
    ("llama", "Q4_1", "tied", "gguf"),
    ("qwen2", "F32", "", "checkpoint"),
    ("qwen2", "F16", "", "gguf"),
]


@pytest.mark.parametrize(("family", "weights", "variant", "reference"), LOGIT_CASES)
def test_gguf_logits_match_pytorch(family, weights, variant, reference, gguf_file, checkpoint, tmp_path):
    gguf = gguf_file(family, weights, variant)
    pipe = export(gguf, tmp_path / "pkg")
    spec = pipe.manifest.target
    assert (spec.exporter, spec.kv_layout, spec.family) == ("builder", "shared-buffer", family)
    model = hf_model(checkpoint(family, variant=variant)) if reference == "checkpoint" else transformers_from_gguf(gguf)
    assert_logits_match(pipe, model)
    if variant == "llama3-rope":  # the scaling arrives as a rope_freqs tensor, and it matters:
        assert open_gguf(gguf).config()["rope_scaling"]["rope_type"] == "freq_factors"
        with pytest.raises(AssertionError):  # transformers 4.57 ignores rope_freqs when it reads a GGUF
            assert_logits_match(pipe, transformers_from_gguf(gguf))


def test_quantized_gguf_really_differs_from_fp32(gguf_file, checkpoint, tmp_path):
    """The Q4_1 comparison above can only catch a dequantization bug if Q4_1 changes the logits."""
    pipe = export(gguf_file("llama", "Q4_1", "tied"), tmp_path / "pkg")
    with pytest.raises(AssertionError):
        assert_logits_match(pipe, hf_model(checkpoint("llama", variant="tied")))


# (GGUF type, --quantize, --block-size, whether MatMulNBits can hold the blocks as they are). Q4_0-searched:
# Q4_0 blocks whose largest code is not -8 (as importance-matrix quantization leaves some), which ONNX
# Runtime's quantizer (scale = largest / -8) re-quantizes with an error; so it does Q8_0 (largest / -128).
# Q4_1 (d * q + m) is stored as d * (q - 8) plus a correction BlockSum(x) @ (m + 8d).
BLOCK_CASES = [
    ("Q4_0", "int4", 32, True),
    ("Q4_0-searched", "int4", 32, True),
    ("Q8_0", "int8", 32, True),
    ("Q4_0", "int8", 32, True),
    ("Q5_0", "int8", 32, True),
    ("Q4_0-searched", "int4", 16, True),
    ("Q4_0-searched", "int4", 64, True),  # kept in the file's blocks of 32
    ("Q8_0", "int4", 32, True),  # kept at 8 bits: the file's choice for that weight
    ("Q4_1", "int4", 32, True),
    ("Q4_1", "int4", 16, True),
    ("Q4_1", "int8", 32, True),
    ("Q4_1", "int4", 64, True),
]


@pytest.mark.parametrize(("weights", "quantize", "block_size", "exact"), BLOCK_CASES)
def test_gguf_blocks_import_without_requantization(weights, quantize, block_size, exact, gguf_file, tmp_path):
    gguf = gguf_file("llama", weights, "tied")  # tied: the token embedding reads the lm_head's blocks
    reference = export(gguf, tmp_path / "fp32")
    # accuracy level 0 (fp32 compute), so exact weights give logits equal to float tolerance
    pipe = export(gguf, tmp_path / "pkg", quantize=quantize, block_size=block_size, accuracy_level=0)
    expected, got = projection_weights(reference), projection_weights(pipe)
    assert got.keys() == expected.keys()
    same = [np.array_equal(got[name], expected[name]) for name in expected]
    assert all(same) if exact else not any(same)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, pipe.target.vocab_size, size=20)]
    logits = [DecoderState(package.target).forward(ids) for package in (pipe, reference)]
    close = np.allclose(*logits, atol=1e-4, rtol=0)
    assert close == exact
    quantization = pipe.manifest.target.quantization
    assert quantization["lossless_nodes"] == (2 * 4 + 1 if exact else 0)
    assert quantization["lossless_offset_nodes"] == (2 * 4 + 1 if exact and weights == "Q4_1" else 0)
    wider = exact and weights == "Q8_0" and quantize == "int4"
    assert quantization["lossless_8bit_nodes"] == (2 * 4 + 1 if wider else 0)
    assert matmul_bits(pipe) == ({8} if wider else {int(quantize[3:])})
    assert quantization["unquantized_matmuls"] == 0
    assert quantization["embedding"].endswith("GatherBlockQuantized, shared with the lm_head")


@pytest.mark.parametrize("weights", ["Q4_1", "Q8_0"])
def test_gguf_blocks_can_be_requantized_for_speed(weights, gguf_file, tmp_path):
    pipe = export(gguf_file("llama", weights, "tied"), tmp_path / "pkg", quantize="int4", keep_gguf_blocks=False)
    quantization = pipe.manifest.target.quantization
    assert quantization["lossless_nodes"] == quantization["lossless_offset_nodes"] == 0
    assert quantization["quantized_nodes"] == 2 * 4 + 1  # every projection and the lm_head, plain MatMulNBits
    assert matmul_bits(pipe) == {4}


def matmul_bits(pipe) -> set[int]:
    """The widths of the target graph's MatMulNBits nodes."""
    graph = onnx.load(pipe.manifest.root / "target" / "model.onnx", load_external_data=False).graph
    return {a.i for node in graph.node if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"}


def q4_1_weight(rng: np.random.Generator, k: int, n: int, low: int = 0, high: int = 15) -> np.ndarray:
    """A MatMul weight [K, N] of Q4_1 blocks d * q + m along K (dequantized as gguf does), codes low..high."""
    d = rng.uniform(1e-3, 1e-2, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.1, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(low, high + 1, (n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = low, high  # each block uses both ends of its span
    return ((d * q) + m).reshape(n, k).T.copy()


def test_q4_1_blocks_are_found_exactly_or_not_at_all():
    rng = np.random.default_rng(0)
    # codes 0..15 as llama.cpp's reference quantizer writes them; 3..12 as its importance-matrix search may
    for low, high in [(0, 15), (3, 12)]:
        weight = q4_1_weight(rng, 64, 24, low, high)
        packed, scales, offsets = offset_blocks(weight, 4, 32)
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(24, 64).astype(np.float32)
        rebuilt = (codes - 8) * np.repeat(scales, 32, axis=1) + np.repeat(offsets.T, 32, axis=1)
        assert np.array_equal(rebuilt.T, weight)  # d * (q - 8) + (m + 8d) is the same float as d * q + m
    weight[5, 7] = np.nextafter(weight[5, 7], np.float32(1))  # one weight one float off: the whole weight fails
    assert offset_blocks(weight, 4, 32) is None
    assert offset_blocks(rng.standard_normal((64, 24)).astype(np.float32), 4, 32) is None


def test_q4_1_target_with_a_head_drafts_exactly(gguf_file, tmp_path):
    """A head's vocabulary-subset lm_head is cut from the target's Q4_1 one: it gets the correction too
    (re-quantized, SmolLM2's head agreed less often with its target: held-out α 0.485 -> 0.449), and greedy
    drafting with the head still equals plain decoding."""
    from helpers.heads import make_head

    gguf = gguf_file("llama", "Q4_1", "tied")
    make_head(gguf, tmp_path / "head")
    pipe = export(gguf, tmp_path / "pkg", quantize="int4", draft=tmp_path / "head")
    assert pipe.manifest.target.quantization["lossless_offset_nodes"] == 2 * 4 + 1
    assert pipe.manifest.draft.quantization["lossless_offset_nodes"] == 1
    spec = pipe.generate([3, 50, 7, 9], max_new_tokens=16, draft="model", draft_tokens=2)
    assert spec.stats.drafter == "head"
    assert spec.token_ids == pipe.generate([3, 50, 7, 9], max_new_tokens=16, use_draft=False).token_ids


def test_manifest_records_source_chat_template_and_eos(gguf_file, tmp_path):
    gguf = gguf_file("llama", "Q8_0")
    pipe = export(gguf, tmp_path / "pkg", quantize="int4")
    m = pipe.manifest
    assert m.target.source == str(gguf)
    assert m.target.source_info["format"] == "gguf"
    assert m.target.source_info["tensor_types"] == {"Q8_0": 2 * 7 + 2, "F32": 2 * 2 + 1}
    assert m.target.quantization["bits"] == 4
    assert m.tokenizer.chat_template == CHAT_TEMPLATE
    assert m.tokenizer.eos_token_ids == [0, 1]  # eos and eot
    assert (m.tokenizer.bos_token_id, m.tokenizer.pad_token_id) == (0, 1)
    assert m.generation["eos_token_id"] == [0, 1]
    messages = [{"role": "user", "content": "def f(x):"}]
    assert pipe.tokenizer.decode(pipe.chat_prompt(messages)) == "user\ndef f(x):assistant\n"  # specials dropped
    assert 0 < len(pipe.generate("def fibonacci(n):", max_new_tokens=8, use_draft=False).token_ids) <= 8


@pytest.mark.parametrize(("family", "add_bos"), [("llama", None), ("llama", True), ("llama", False), ("qwen2", None)])
def test_tokenizer_encodes_like_transformers(family, add_bos, gguf_file, tmp_path):
    from transformers import AutoTokenizer

    gguf = gguf_file(family, add_bos=add_bos)
    ours = export(gguf, tmp_path / "pkg").tokenizer
    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TEXTS:
        if family == "qwen2" and "<|pad|>" in text:
            # transformers makes only <|endoftext|>, <|im_start|> and <|im_end|> special for qwen2; we take
            # every control token of the file as llama.cpp does (all of them are added tokens in Qwen's own)
            assert ours.encode("<|pad|>") == [1]
            continue
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        with_specials = theirs(text)["input_ids"]
        if add_bos is False:  # transformers 4.57 ignores tokenizer.ggml.add_bos_token = false; llama.cpp does not
            with_specials = with_specials[1:]
        assert ours.encode(text) == with_specials, text
        plain = text.replace("<|endoftext|>", "").replace("<|pad|>", "")  # decoding drops special tokens
        if family == "qwen2":
            plain = unicodedata.normalize("NFC", plain)  # Qwen2's tokenizer normalizes first
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == plain, text


def write_sentencepiece_gguf(path: Path, model: str = "llama") -> Path:
    """A tokenizer-only llama GGUF with a SentencePiece-style vocabulary: scores, byte tokens, no merges."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(pieces)
    writer = GGUFWriter(str(path), "llama")
    for add, value in [
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 32),
        (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 64),
        (writer.add_head_count, 2),
        (writer.add_head_count_kv, 2),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_vocab_size, len(tokens)),
        (writer.add_tokenizer_model, model),
        (writer.add_token_list, tokens),
        (writer.add_token_scores, [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]),
        (writer.add_token_types, types),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_unk_token_id, 0),
    ]:
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_tokenizer_encodes_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    from ortspec.export.gguf_tokenizer import write_gguf_tokenizer

    gguf = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    write_gguf_tokenizer(open_gguf(gguf), tmp_path / "tok")
    ours = TextTokenizer.from_directory(tmp_path / "tok")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    texts = [*TEXTS, "<s>hello</s> <unk> world", "hello  world", "\nstart"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text) == theirs(text)["input_ids"], text
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_merges_from_scores_rank_by_merged_score_then_parts():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, -1.0, -2.0, -1.0, -3.0]
    # bc (-1) before ab (-2) before abc (-3); abc = a+bc (parts 0, -1) before ab+c (parts -2, -1)
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_unsupported_architecture_is_refused(checkpoint, tmp_path):
    gguf = write_gguf(checkpoint("llama"), tmp_path / "phi.gguf", architecture="phi2")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'phi2' is not supported"):
        export_pair(gguf, tmp_path / "pkg", report=lambda _: None)
    assert not (tmp_path / "pkg").exists()


def test_unsupported_tokenizer_is_refused(tmp_path):
    from ortspec.export.gguf_tokenizer import gguf_tokenizer

    gguf = write_sentencepiece_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(UnsupportedTokenizerError, match="tokenizer model 'bert' is not supported"):
        gguf_tokenizer(open_gguf(gguf))


def test_optimum_exporter_is_refused_for_gguf(gguf_file, tmp_path):
    with pytest.raises(ValueError, match="only the builder exports"):
        export_pair(gguf_file(), tmp_path / "pkg", exporter="optimum", report=lambda _: None)


def test_cli_exports_gguf_target_and_draft(gguf_file, tmp_path):
    assert "GGUF" in CliRunner().invoke(cli, ["export", "--help"]).output
    target, draft = gguf_file("llama", "Q8_0"), gguf_file("llama", "Q8_0", kind="close")
    out = tmp_path / "pair"
    result = CliRunner().invoke(cli, ["export", str(target), "--draft", str(draft), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["draft"]["source_info"]["format"] == "gguf"
    assert manifest["compatibility"]["tokenizers_equal"] is True
    pipe = ortspec.load(out)
    spec = pipe.generate([3, 50, 7], max_new_tokens=10, draft_tokens=3)
    assert spec.token_ids == pipe.generate([3, 50, 7], max_new_tokens=10, use_draft=False).token_ids


def test_catalog_package_exports_the_fetched_gguf_with_its_head(gguf_file, tmp_path, monkeypatch):
    """What `ortspec demo --model` runs: the fetched GGUF exported with the shipped head (the PyPI fetch
    is stubbed: tests use no network), cached, and drafting with the head is exact."""
    from ortspec.models import catalog

    from helpers.heads import make_head

    gguf = gguf_file("llama", "Q8_0")
    make_head(gguf, tmp_path / "heads" / "smollm2")
    monkeypatch.setattr(catalog, "HEADS", tmp_path / "heads")
    monkeypatch.setattr(catalog, "fetch_gguf", lambda model, report: gguf)
    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "cache"))
    out = catalog.catalog_package("smollm2", quantize="none", report=lambda _: None)
    assert out.parent == tmp_path / "cache"
    assert catalog.catalog_package("smollm2", quantize="none", report=lambda _: None) == out  # cached
    # a PACKAGE argument: a directory as given (even one named like a catalog model), else the catalog's
    monkeypatch.setattr(catalog, "catalog_package", lambda name, report: out if name == "smollm2" else None)
    assert catalog.resolve_package("smollm2") == out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert catalog.resolve_package("smollm2") == Path("smollm2")
    with pytest.raises(ValueError, match="'nope' is neither a package directory nor a catalog model"):
        catalog.resolve_package("nope")
    pipe = ortspec.load(out)
    assert pipe.manifest.draft.is_head
    spec = pipe.generate([3, 50, 7, 9], max_new_tokens=16, draft="model", draft_tokens=2)
    assert spec.stats.drafter == "head"
    assert spec.token_ids == pipe.generate([3, 50, 7, 9], max_new_tokens=16, use_draft=False).token_ids


def test_distill_reads_a_gguf_target(gguf_file, tmp_path):
    """`ortspec distill model.gguf`: the head's layer starts from the GGUF's last layer, torch reads no HF files."""
    from ortspec.export.distill import DistillConfig, distill

    gguf = gguf_file("llama", "Q8_0")
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    config = DistillConfig(minutes=0.02, text=(str(text),), quantize="none", vocab=32, held_out=1, threads=1)
    head = distill(str(gguf), tmp_path / "head", config, report=lambda _: None)
    training = json.loads((head / "head.json").read_text())["training"]
    assert training["held_out_agreement"] is None or 0 <= training["held_out_agreement"] <= 1
    pipe = export(gguf, tmp_path / "pkg", draft=head)
    assert pipe.manifest.draft.is_head
    assert pipe.generate([3, 50, 7], max_new_tokens=8, draft="model", draft_tokens=2).stats.drafter == "head"
