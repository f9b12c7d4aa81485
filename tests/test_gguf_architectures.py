"""GGUFs of the qwen3, gemma3, phi3 and Mistral-style llama architectures, written from the suite's checkpoints
as llama.cpp's converter writes them: the package exported from the GGUF computes the logits and greedy
generations of the package exported from the checkpoint itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ortspec
from ortspec.export import export_pair
from ortspec.export.builder import UnsupportedModelError
from ortspec.export.builder.gguf_file import GGUFError
from ortspec.export.builder.gguf_io import open_gguf
from ortspec.runtime.model.decoder import DecoderState

from helpers.gguf_files import write_gguf

# (family, checkpoint variant, write_gguf options, the family the GGUF is built as; what the case covers)
CASES = [
    # q/k norms, head_dim 128 from key_length (4 heads of a 64-wide model)
    ("qwen3", "", {}, "qwen3"),
    # a bfloat16 checkpoint converted to BF16 tensors (the converter's default for it)
    ("qwen3", "bf16", {"weights": "BF16"}, "qwen3"),
    # norms stored as 1 + w (q/k norms too), sandwich norms, 5 sliding layers then a global one with linear
    # rope scaling, final soft-capping
    ("gemma3_text", "gguf", {}, "gemma3_text"),
    # the same, its layer kinds given per layer (attention.sliding_window_pattern as a flag array)
    (
        "gemma3_text",
        "gguf",
        {"metadata": {"{arch}.attention.sliding_window_pattern": [True] * 5 + [False]}},
        "gemma3_text",
    ),
    # fused qkv and gate+up, partial rotary, longrope factors (the long ones past 32 positions)
    ("phi3", "", {}, "phi3"),
    # Mistral-style llama: permuted q/k rows of heads wider than hidden / heads
    ("mistral", "wide-heads", {}, "llama"),
    # a llama file that names its sliding window is built as Mistral
    ("mistral", "", {"window_key": True}, "mistral"),
]


def case_ids(cases: list) -> list[str]:
    """family[-variant][-what the options change: the weight type, dropped or changed tensors and keys]."""

    def changed(options: dict) -> list[str]:
        names = [options.get("weights", ""), *options.get("drop", ()), *options.get("metadata", {})]
        return [n.replace("{arch}.", "") for n in names if n] + (["window"] if options.get("window_key") else [])

    return ["-".join([c[0], *([c[1]] if c[1] else []), *changed(c[2])]) for c in cases]


def export(source: Path, out: Path) -> ortspec.Pipeline:
    export_pair(source, out, quantize="none", report=lambda _: None)
    return ortspec.load(out)


def logits(pipe: ortspec.Pipeline, ids: list[int]) -> np.ndarray:
    """A 30-token prefill then single steps, past every window and longrope's switch at 32 positions."""
    state = DecoderState(pipe.target)
    return np.concatenate([state.forward(ids[:30])] + [state.forward([t]) for t in ids[30:]])


@pytest.mark.parametrize(("family", "variant", "options", "built_as"), CASES, ids=case_ids(CASES))
def test_gguf_package_equals_checkpoint_package(family, variant, options, built_as, checkpoint, tmp_path):
    source = checkpoint(family, variant=variant)
    gguf = write_gguf(source, tmp_path / f"{family}.gguf", **options)
    from_gguf, from_checkpoint = export(gguf, tmp_path / "gguf"), export(source, tmp_path / "hf")
    assert (from_gguf.manifest.target.family, from_checkpoint.manifest.target.family) == (built_as, family)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, from_gguf.target.vocab_size, size=40)]
    expected = logits(from_checkpoint, ids)
    np.testing.assert_allclose(logits(from_gguf, ids), expected, atol=1e-5, rtol=0)
    prompt = ids[:5]
    greedy = [p.generate(prompt, max_new_tokens=40, use_draft=False).token_ids for p in (from_gguf, from_checkpoint)]
    assert greedy[0] == greedy[1]


# (family, variant, write_gguf options, error, message): a tensor or key the architecture needs, missing or
# out of range, is refused in one line naming it
REFUSALS = [
    ("qwen3", "", {"drop": ("blk.1.attn_k_norm.weight",)}, GGUFError, "has no tensor blk.1.attn_k_norm.weight"),
    ("gemma3_text", "gguf", {"drop": ("blk.0.post_ffw_norm.weight",)}, GGUFError, "no tensor blk.0.post_ffw_norm"),
    ("phi3", "", {"drop": ("rope_factors_short.weight",)}, GGUFError, "has no tensor rope_factors_short.weight"),
    (
        "phi3",
        "",
        {"drop": ("{arch}.rope.scaling.original_context_length",)},
        GGUFError,
        "has no metadata phi3.rope.scaling.original_context_length",
    ),
    ("phi3", "", {"metadata": {"{arch}.rope.scaling.type": "yarn"}}, UnsupportedModelError, "rope scaling 'yarn'"),
    ("phi3", "", {"metadata": {"{arch}.rope.dimension_count": 11}}, UnsupportedModelError, "11 of 16 dims"),
    ("llama", "", {"metadata": {"{arch}.rope.dimension_count": 8}}, UnsupportedModelError, "phi3 only"),
    (
        "gemma3_text",
        "gguf",
        {"metadata": {"{arch}.attention.sliding_window_pattern": [True, False]}},
        GGUFError,
        "sliding_window_pattern is not one true/false per layer",
    ),
    (
        "qwen3",
        "",
        {"metadata": {"{arch}.attention.key_length": 64, "{arch}.attention.value_length": 64}},
        GGUFError,
        r"has shape \[64, 512\], expected \[64, 256\] from the metadata",
    ),
]


@pytest.mark.parametrize(("family", "variant", "options", "error", "message"), REFUSALS, ids=case_ids(REFUSALS))
def test_missing_architecture_tensors_and_keys_are_refused(family, variant, options, error, message, checkpoint,
                                                           tmp_path):  # fmt: skip
    gguf = write_gguf(checkpoint(family, variant=variant), tmp_path / "bad.gguf", **options)
    with pytest.raises(error, match=message) as refused:
        open_gguf(gguf).config()
    assert "\n" not in str(refused.value)


def test_qwen3_tokenizer_encodes_like_transformers(checkpoint, tmp_path):
    """qwen3 files carry Qwen2's byte-level vocabulary: NFC and Qwen2's split pattern, no BOS."""
    from transformers import AutoTokenizer

    from ortspec.export.gguf_tokenizer import write_gguf_tokenizer
    from ortspec.runtime.text.tokenizer import TextTokenizer

    gguf = write_gguf(checkpoint("qwen3"), tmp_path / "qwen3.gguf")
    write_gguf_tokenizer(open_gguf(gguf), tmp_path / "tok")
    ours = TextTokenizer.from_directory(tmp_path / "tok")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    for text in ["def f(x):\n    return x  # 2024", "Ünïcödé e\u0301 日本語 🙂", "  a\r\n\n b   ", "it's we'll"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
