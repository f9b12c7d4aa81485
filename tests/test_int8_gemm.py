"""The int8 GEMM kernel option (`--int8-kernel gemm`): int8 projections through MatMulInteger with activations
quantized per row keep each position's result independent of the other positions in a call, so greedy
speculative output is plain greedy output, and the manifest says which kernel the package runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_streaming_export import run

import ortspec
from ortspec.cli import main
from ortspec.export import export_pair
from ortspec.export.quantize.int8_gemm import ROW_CONSTANTS, column_int8, row_quantized_matmul
from ortspec.runtime.package import graph_names as names


def matmul_session(kind: str, weight: np.ndarray) -> ort.InferenceSession:
    """x [S, K] @ weight through the row-quantized subgraph ("rows") or DynamicQuantizeMatMul ("call")."""
    codes, scales = column_int8(weight)
    inits = [numpy_helper.from_array(codes, "W"), numpy_helper.from_array(scales, "s")]
    if kind == "rows":
        nodes = row_quantized_matmul("w", "x", "W", "s", "y")
        inits += [numpy_helper.from_array(array, name) for name, array in ROW_CONSTANTS.items()]
    else:
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "W", "s"], ["y"], domain="com.microsoft")]
    k, n = weight.shape
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def rows_alone_and_together(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 96), dtype=np.float32)
    magnitudes = np.float32(10.0) ** np.arange(-2, 6, dtype=np.float32)[:, None]  # rows far apart in scale
    x = rng.standard_normal((8, 256), dtype=np.float32) * magnitudes
    session = matmul_session(kind, weight)
    together = session.run(None, {"x": x})[0]
    alone = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    return together, alone


def test_a_row_quantized_matmul_computes_each_row_alone_bit_for_bit():
    together, alone = rows_alone_and_together("rows")
    np.testing.assert_array_equal(together, alone)


def test_dynamic_quantize_matmul_couples_the_rows_of_a_call():
    """Why the kernel quantizes per row: one scale per call changes a small row's result with its neighbours."""
    together, alone = rows_alone_and_together("call")
    assert not np.array_equal(together, alone)


def test_column_int8_round_trips_within_half_a_step():
    weight = np.random.default_rng(1).standard_normal((64, 40), dtype=np.float32)
    weight[:, 3] = 0  # an all-zero column
    codes, scales = column_int8(weight)
    assert codes.dtype == np.int8 and scales.shape == (40,) and scales[3] == 0
    assert np.abs(codes.astype(np.float32) * scales - weight).max() <= scales.max() / 2 + 1e-7


@pytest.fixture(scope="module")
def gemm_package(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemm") / "pkg"
    export_pair(
        checkpoint("llama"), out, draft=checkpoint("llama", "close"), quantize="int8", int8_kernel="gemm",
        report=lambda _: None,
    )  # fmt: skip
    return out


def test_manifest_and_info_name_the_kernel(gemm_package):
    manifest = ortspec.load(gemm_package).manifest
    target, draft = manifest.target.quantization, manifest.draft.quantization
    model = onnx.load(gemm_package / "target" / "model.onnx", load_external_data=False)
    matmuls = sum(node.op_type == "MatMulInteger" for node in model.graph.node)
    assert target["int8_kernel"] == "gemm" and target["int8_gemm_nodes"] == matmuls > 0
    assert "int8_kernel" not in draft  # the draft keeps MatMulNBits
    assert not any(node.op_type == "DynamicQuantizeMatMul" for node in model.graph.node)
    result = CliRunner().invoke(main, ["info", str(gemm_package)])
    assert result.exit_code == 0, result.output
    assert f"of which {matmuls} int8 GEMM" in result.output


def test_positions_in_one_call_match_single_steps(gemm_package):
    """A prompt's logits at each position equal those of feeding its tokens one call at a time: only the
    attention's summation order differs between the two, never which rows share a quantization scale."""
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, size=10)]
    path = gemm_package / "target" / "model.onnx"
    together = run(path, ids)[0][0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {names.LOGITS_TO_KEEP: np.array([0], np.int64)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros([1, value.shape[1], 32, value.shape[3]], np.float32)
    steps = []
    for i, token in enumerate(ids):
        feeds[names.INPUT_IDS] = np.array([[token]], np.int64)
        feeds[names.SEQLENS_K] = np.array([i], np.int32)
        feeds[names.TOTAL_SEQUENCE_LENGTH] = np.array(i + 1, np.int32)
        outputs = session.run(None, feeds)
        steps.append(outputs[0][0, -1])
        for j, value in enumerate(session.get_outputs()):
            if value.name.startswith("present"):
                feeds[value.name.replace("present", "past_key_values")] = outputs[j]
    np.testing.assert_allclose(np.stack(steps), together, rtol=0, atol=1e-5)  # logits ~8: a few ulps


def test_greedy_speculative_output_is_plain_greedy_output(gemm_package):
    pipe = ortspec.load(gemm_package)
    for seed in range(3):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(2, 300, size=7)] * 3
        plain = pipe.generate(prompt, max_new_tokens=32, use_draft=False)
        for draft in ("model", "suffix"):
            spec = pipe.generate(prompt, max_new_tokens=32, draft=draft, draft_tokens=4)
            assert spec.token_ids == plain.token_ids, (seed, draft)


def test_the_gemm_kernel_needs_int8(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs quantize='int8'"):
        export_pair(checkpoint("llama"), tmp_path / "p", quantize="int4", int8_kernel="gemm", report=lambda _: None)


def test_the_gemm_kernel_needs_the_builders_fp32_graph(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs the builder's fp32 graph"):
        export_pair(checkpoint("llama"), tmp_path / "p", quantize="int8", int8_kernel="gemm", dtype="fp16",
                    report=lambda _: None)  # fmt: skip


def test_cli_export_option(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    args = ["export", str(checkpoint("llama")), "--out", str(out), "--quantize", "int8", "--int8-kernel", "gemm"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ortspec.load(out).manifest.target.quantization["int8_kernel"] == "gemm"
