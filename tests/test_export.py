"""Export: quantization really happens, pairs are checked, packages appear atomically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortspec
from ortspec.export import CheckpointError, IncompatiblePairError, export_pair
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.publish import PackageExistsError
from ortspec.export.quantize import dequantized_weight, quantize_weights
from ortspec.models.random import make_checkpoint, perturbed_copy


def ops(source) -> dict[str, int]:
    counts: dict[str, int] = {}
    model = source if isinstance(source, onnx.ModelProto) else onnx.load(source)
    for node in model.graph.node:
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


def initializer_bytes(path) -> int:
    return sum(numpy_helper.to_array(init).nbytes for init in onnx.load(path).graph.initializer)


def test_tied_embedding_is_stored_once(package, checkpoint):
    tied = package("llama", draft=None, quantize="int4", exporter="builder", variant="tied") / "target" / "model.onnx"
    untied = package("llama", draft=None, quantize="int4", exporter="builder") / "target" / "model.onnx"
    counts = ops(tied)
    assert counts.get("GatherBlockQuantized") == 1 and "Gather" not in counts
    assert counts.get("MatMulNBits") == ops(untied).get("MatMulNBits") == 2 * 4 + 1
    assert ops(untied).get("GatherBlockQuantized") == 1  # an untied table is quantized on its own
    # same shapes: the untied package holds the table's int4 blocks and scales besides its lm_head's
    graph = onnx.load(tied).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0])  # the lm_head
    vocab, hidden = (next(a.i for a in head.attribute if a.name == dim) for dim in "NK")
    blocks = vocab * hidden // 2 + vocab * hidden // 32 * 4
    assert blocks - 64 < initializer_bytes(untied) - initializer_bytes(tied) <= blocks


def tied_graph(vocab: int, hidden: int, tie: bool) -> onnx.ModelProto:
    """input_ids -> Gather(table) -> rows -> MatMul(table.T, or another matrix) -> logits; both are outputs."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    head = table.T.copy() if tie else rng.standard_normal((hidden, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
            helper.make_node("MatMul", ["rows", "head"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, "S", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", vocab]),
        ],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_rows_are_the_lm_head_weights(bits):
    """The quantized Gather reads the lm_head's own blocks: each row equals the lm_head's dequantized column."""
    vocab, hidden = 48, 96
    model, summary = quantize_weights(tied_graph(vocab, hidden, tie=True), bits, 32, accuracy_level=0)
    nodes = {node.op_type: node for node in model.graph.node}
    assert "Gather" not in nodes and nodes["GatherBlockQuantized"].input[0] == nodes["MatMulNBits"].input[1]
    assert summary["embedding"] == f"int{bits} GatherBlockQuantized, shared with the lm_head"
    assert "table" not in {init.name for init in model.graph.initializer}  # no fp32 copy left
    weight = dequantized_weight(nodes["MatMulNBits"], {init.name: init for init in model.graph.initializer})
    ids = np.array([[0, 5, vocab - 1, 5]])
    rows, logits = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids}
    )
    np.testing.assert_array_equal(rows[0], weight.T[ids[0]])
    np.testing.assert_allclose(logits[0], rows[0] @ weight, atol=1e-4, rtol=0)


def test_untied_embedding_keeps_its_fp32_table():
    model, summary = quantize_weights(tied_graph(48, 96, tie=False), 4, 32)
    assert ops(model) == {"Gather": 1, "MatMulNBits": 1} and summary["embedding"] == "fp32 Gather"


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

    monkeypatch.setattr(pair, "quantize_weights", fail)  # the whole-graph quantizer (optimum's exports)
    with pytest.raises(KeyboardInterrupt):
        export_pair(checkpoint("llama"), tmp_path / "pkg", quantize="int4", exporter="optimum", report=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pair.StreamingQuantizer, "store", fail)  # the builder's, half-way through its data file
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
