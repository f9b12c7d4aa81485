"""Export: quantization really happens, pairs are checked, packages appear atomically."""

from __future__ import annotations

import onnx
import pytest

import ortspec
from ortspec.export import CheckpointError, IncompatiblePairError, export_pair
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.publish import PackageExistsError
from ortspec.models.random import make_checkpoint, perturbed_copy


def ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_gpt2_gemm_projections_are_quantized(quantize, package):
    root = package("gpt2", draft=None, quantize=quantize)
    counts = ops(root / "target" / "model.onnx")
    # 2 layers x (qkv, attention out, mlp in, mlp out) + lm_head
    assert counts.get("MatMulNBits") == 2 * 4 + 1
    assert "Gemm" not in counts
    assert ortspec.load(root).manifest.target.quantization["gemm_rewritten"] == 2 * 4


def test_llama_projections_are_quantized(package):
    counts = ops(package("llama", draft=None, quantize="int4", exporter="optimum") / "target" / "model.onnx")
    assert counts.get("MatMulNBits") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    counts = ops(package("llama", draft=None, quantize="int4", exporter="builder") / "target" / "model.onnx")
    assert counts.get("MatMulNBits") == 2 * 4 + 1  # fused qkv, o, fused gate_up, down per layer + lm_head
    assert counts.get("GroupQueryAttention") == 2 and "MatMul" not in counts


def test_incompatible_tokenizer_is_refused(checkpoint, tmp_path):
    other = make_checkpoint(tmp_path / "other-tok", "llama", tokenizer_vocab=320)
    with pytest.raises(IncompatiblePairError, match=r"token id \d+ is '.*' for the target but"):
        export_pair(checkpoint("llama"), tmp_path / "pkg", draft=other, quantize="none", report=lambda _: None)
    assert not (tmp_path / "pkg").exists()


def test_draft_with_padding_rows_is_accepted(checkpoint, tmp_path):
    target = checkpoint("llama")
    draft = perturbed_copy(target, tmp_path / "padded", noise=0.05, vocab_rows=400)
    manifest = export_pair(target, tmp_path / "pkg", draft=draft, quantize="none", report=lambda _: None)
    assert (manifest.draft.vocab_size, manifest.target.vocab_size) == (400, 384)
    assert manifest.compatibility["shared_vocab_size"] == 384
    pipe = ortspec.load(tmp_path / "pkg")
    for gamma in (2, 4):
        spec = pipe.generate([3, 40, 7], max_new_tokens=20, draft_tokens=gamma)
        assert spec.token_ids == pipe.generate([3, 40, 7], max_new_tokens=20, use_draft=False).token_ids
        assert spec.stats.accepted_tokens > 0


def test_existing_output_needs_force(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    export_pair(checkpoint("llama"), out, quantize="none", report=lambda _: None)
    with pytest.raises(PackageExistsError, match="--force"):
        export_pair(checkpoint("llama"), out, quantize="none", report=lambda _: None)
    export_pair(checkpoint("llama"), out, quantize="int8", force=True, report=lambda _: None)
    assert ortspec.load(out).manifest.target.quantization["bits"] == 8
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(PackageExistsError, match="not an ortspec package"):
        export_pair(checkpoint("llama"), user_dir, quantize="none", force=True, report=lambda _: None)
    assert (user_dir / "notes.txt").read_text() == "keep me"


def test_interrupted_export_leaves_no_package(checkpoint, tmp_path, monkeypatch):
    from ortspec.export import pair

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pair, "quantize_weights", fail)
    with pytest.raises(KeyboardInterrupt):
        export_pair(checkpoint("llama"), tmp_path / "pkg", quantize="int4", report=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not available locally"):
        resolve_checkpoint("ortspec-test-org/no-such-model-anywhere")
