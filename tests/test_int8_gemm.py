"""The int8 GEMM kernel options (`--int8-kernel gemm`, `--lm-head-kernel gemm`): int8 projections and lm_head
through MatMulInteger with activations quantized per row keep each position's result independent of the other
positions in a call, so greedy speculative output is plain greedy output, and the manifest says which kernel
the package runs."""

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
from ortspec.export.quantize import streaming
from ortspec.export.quantize.int8_gemm import RESIDUAL_CONSTANTS, ROW_CONSTANTS, column_int8, row_quantized_matmul
from ortspec.runtime.package import graph_names as names

from helpers.gguf_files import write_gguf


def matmul_session(kind: str, weight: np.ndarray) -> ort.InferenceSession:
    """x [S, K] @ weight through the row-quantized subgraph ("rows"; "residual": with each row's rounding error)
    or DynamicQuantizeMatMul ("call")."""
    codes, scales = column_int8(weight)
    inits = [numpy_helper.from_array(codes, "W"), numpy_helper.from_array(scales, "s")]
    if kind in ("rows", "residual"):
        nodes = row_quantized_matmul("w", "x", "W", "s", "y", residual=kind == "residual")
        constants = ROW_CONSTANTS | (RESIDUAL_CONSTANTS if kind == "residual" else {})
        inits += [numpy_helper.from_array(array, name) for name, array in constants.items()]
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


@pytest.mark.parametrize("kind", ["rows", "residual"])
def test_a_row_quantized_matmul_computes_each_row_alone_bit_for_bit(kind):
    together, alone = rows_alone_and_together(kind)
    np.testing.assert_array_equal(together, alone)


def test_residual_rows_carry_an_outlier_rows_small_entries():
    """A row with one entry 20x the rest: one int8 scale leaves the rest a few codes; the residual row restores
    them, so only the weights' per-column rounding remains."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((256, 96), dtype=np.float32)
    x = rng.standard_normal((4, 256), dtype=np.float32)
    x[:, 7] = 20
    codes, scales = column_int8(weight)
    exact = x @ (codes.astype(np.float32) * scales)  # the int8 weights in fp32: the activations' error alone
    errors = {
        kind: np.abs(matmul_session(kind, weight).run(None, {"x": x})[0] - exact).max() for kind in ("rows", "residual")
    }
    assert errors["residual"] < errors["rows"] / 50, errors


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


def test_column_int8_of_a_table_read_in_slices_equals_the_whole(monkeypatch):
    """A large table (the lm_head) is quantized a slice of columns at a time; the slices join to the whole's."""
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 64 * 7)  # 7 columns a slice: 6 slices of 40 columns
    weight = np.random.default_rng(3).standard_normal((64, 40), dtype=np.float32)
    got, expected = streaming.by_columns(column_int8, weight, column_axes=(1, 0)), column_int8(weight)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def gemm_package(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemm") / "pkg"
    export_pair(
        checkpoint("llama"), out, draft=checkpoint("llama", "close"), quantize="int8", int8_kernel="gemm",
        report=lambda _: None,
    )  # fmt: skip
    return out


def op_counts(path) -> dict[str, int]:
    model = onnx.load(path, load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_manifest_and_info_name_the_kernel(gemm_package):
    manifest = ortspec.load(gemm_package).manifest
    target, draft = manifest.target.quantization, manifest.draft.quantization
    ops = op_counts(gemm_package / "target" / "model.onnx")
    matmuls = ops["MatMulInteger"]
    assert target["int8_kernel"] == "gemm" and target["int8_gemm_nodes"] == matmuls > 0
    assert target["lm_head_kernel"] == "gemm" and "MatMulNBits" not in ops  # the lm_head too
    assert "int8_kernel" not in draft and draft["lm_head_kernel"] == "nbits"  # the draft keeps MatMulNBits
    assert "DynamicQuantizeMatMul" not in ops
    result = CliRunner().invoke(main, ["info", str(gemm_package)])
    assert result.exit_code == 0, result.output
    assert f"of which {matmuls} int8 GEMM (MatMulInteger, per-row activation scales), the lm_head" in result.output


def test_positions_in_one_call_match_single_steps(gemm_package):
    """A prompt's logits at each position equal those of feeding its tokens one call at a time: only the
    attention's summation order differs between the two, never which rows share a quantization scale. That
    order's last-bit differences can flip a residual row's rounding, 1/254 of a row's int8 step: ~1e-4 of
    these logits (~8), where rows sharing a scale would differ by whole steps (~1e-1)."""
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
    np.testing.assert_allclose(np.stack(steps), together, rtol=0, atol=1e-3)


def test_greedy_speculative_output_is_plain_greedy_output(gemm_package):
    pipe = ortspec.load(gemm_package)
    for seed in range(3):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(2, 300, size=7)] * 3
        plain = pipe.generate(prompt, max_new_tokens=32, use_draft=False)
        for draft in ("model", "suffix"):
            spec = pipe.generate(prompt, max_new_tokens=32, draft=draft, draft_tokens=4)
            assert spec.token_ids == plain.token_ids, (seed, draft)


@pytest.fixture(scope="module")
def int4_gemm_head(checkpoint, tmp_path_factory):
    """int4 projections, the tied lm_head on the int8 GEMM (a copy of its own), from a Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("int4-gemm-head")
    gguf = write_gguf(checkpoint("llama", variant="tied"), root / "model.gguf", weights="Q8_0")
    export_pair(gguf, root / "pkg", quantize="int4", lm_head_kernel="gemm", report=lambda _: None)
    return root / "pkg"


def test_a_tied_lm_head_on_the_gemm_gets_its_own_copy(int4_gemm_head):
    quantization = ortspec.load(int4_gemm_head).manifest.target.quantization
    ops = op_counts(int4_gemm_head / "target" / "model.onnx")
    assert quantization["lm_head_kernel"] == "gemm" and quantization["int8_gemm_nodes"] == ops["MatMulInteger"] == 1
    assert "int8_kernel" not in quantization and ops["MatMulNBits"] > 0  # the projections stay int4 blocks
    assert quantization["embedding"] == "int8 GatherBlockQuantized"  # the file's Q8_0 blocks, no longer shared
    gguf = quantization["gguf_blocks"]  # the lookup keeps the table's blocks, the lm_head re-quantizes them
    assert gguf["requantized_tensors"] == ["token_embd.weight (Q8_0)"] and gguf["kept_exactly"]["Q8_0"] > 0
    result = CliRunner().invoke(main, ["info", str(int4_gemm_head)])
    assert result.exit_code == 0, result.output
    assert "of which 1 int8 GEMM (MatMulInteger, per-row activation scales), the lm_head among them" in result.output


def test_an_lm_head_on_the_gemm_scores_its_features_nearly_exactly(int4_gemm_head, checkpoint, tmp_path):
    """The logits are the final features times the stored int8 columns, up to the residual rows' ~15-bit
    activations; against the Q8_0 blocks' lm_head, they move by the weights' per-column rounding."""
    path = int4_gemm_head / "target" / "model.onnx"
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, size=12)]
    logits, features = (array[0] for array in run(path, ids))
    stored = {init.name: numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}
    columns = stored["lm_head.weight_int8"].astype(np.float32) * stored["lm_head.weight_column_scales"]
    exact = features.astype(np.float64) @ columns
    assert np.abs(logits - exact).max() < 1e-3 * exact.std()  # 1.2e-4 here; without the residual rows ~1e-2
    gguf = write_gguf(checkpoint("llama", variant="tied"), tmp_path / "model.gguf", weights="Q8_0")
    export_pair(gguf, tmp_path / "pkg", quantize="int4", report=lambda _: None)
    blocks = run(tmp_path / "pkg" / "target" / "model.onnx", ids)[0][0]
    assert np.abs(logits - blocks).max() < 0.05 * blocks.std()


def test_the_lm_head_gemm_needs_a_quantized_target(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs a quantized target"):
        export_pair(checkpoint("llama"), tmp_path / "p", quantize="none", lm_head_kernel="gemm", report=lambda _: None)


def test_the_gemm_kernel_needs_int8(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs quantize='int8'"):
        export_pair(checkpoint("llama"), tmp_path / "p", quantize="int4", int8_kernel="gemm", report=lambda _: None)


def test_the_gemm_kernel_needs_the_builders_fp32_graph(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs the builder's fp32 graph"):
        export_pair(checkpoint("llama"), tmp_path / "p", quantize="int8", int8_kernel="gemm", dtype="fp16",
                    report=lambda _: None)  # fmt: skip


@pytest.mark.parametrize(
    "options, kernels",
    [
        (["--quantize", "int8", "--int8-kernel", "gemm"], ("gemm", "gemm")),
        (["--quantize", "int8", "--int8-kernel", "gemm", "--lm-head-kernel", "nbits"], ("gemm", "nbits")),
        (["--lm-head-kernel", "gemm"], (None, "gemm")),
    ],
)
def test_cli_export_options(options, kernels, checkpoint, tmp_path):
    out = tmp_path / "pkg"
    result = CliRunner().invoke(main, ["export", str(checkpoint("llama")), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    quantization = ortspec.load(out).manifest.target.quantization
    assert (quantization.get("int8_kernel"), quantization["lm_head_kernel"]) == kernels
    graph = onnx.load(out / "target" / "model.onnx", load_external_data=False).graph
    used = {name for node in graph.node for name in node.input}
    assert not [init.name for init in graph.initializer if init.name not in used]  # only the constants it reads
