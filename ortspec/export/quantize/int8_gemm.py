"""int8 weights with one scale per output column, multiplied by ONNX Runtime's int8 GEMM (MatMulInteger)
with the activations quantized to int8 per row (per position).

Why: on CPU a call of up to 16 positions then costs about what one position costs (MatMulNBits' int4
kernels grow ~1.6x by 4 positions), which is what verifying a speculative draft asks of the target
(docs/design.md, "Many positions per call"). DynamicQuantizeMatMul would run the same GEMM but with one
activation scale for the whole call, so a position's result would depend on the other positions in the
call; with a scale per row it does not, and greedy speculative output stays plain greedy output.

One int8 scale per row costs precision where a row has outliers: the final features of SmolLM2-135M peak at
~15x their RMS, so most entries get a few of the 255 codes, and the lm_head's KL against fp32 is ~8x what
per-column int8 weights alone cost. `residual=True` also quantizes each row's rounding error, as a second int8
row at 1/254 of the scale run in the same GEMM call: ~15-bit activations for twice the rows (flat up to 16).
The exporter writes every projection so: with one int8 row alone, SmolLM2-135M kept 91% of its top-1 tokens
against 96.8% with the residual rows, and a call's positions differed from one-position steps by whole logits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

# Constants every row-quantized matmul reads (a graph holds them once): the reduced axis, 1/127, the
# smallest row scale (an all-zero row), and uint8's zero point with a unit scale (MLAS's u8 x s8 kernels take
# unsigned rows: QuantizeLinear rounds, shifts by 128 and casts in one pass).
ROW_CONSTANTS: dict[str, np.ndarray] = {
    "rowq_axis": np.array([-1], np.int64),
    "rowq_inv127": np.array(1 / 127, np.float32),
    "rowq_tiny": np.array(1e-12, np.float32),
    "rowq_unit": np.array(1, np.float32),
    "rowq_zero_point": np.array(128, np.uint8),
}
# and the step of `residual=True`'s rows: a rounding error lies within ±0.5 of a step, so ±127 of these
RESIDUAL_STEPS = 254
RESIDUAL_CONSTANTS: dict[str, np.ndarray] = {
    "rowq_residual_step": np.array(1 / RESIDUAL_STEPS, np.float32),
}


def column_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes [K, N] and one fp32 scale per output column [N] for a MatMul weight W [K, N]."""
    weight = np.asarray(weight, np.float32)
    scales = (np.abs(weight).max(axis=0) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))  # an all-zero column keeps codes 0 and scale 0
    codes = np.clip(np.rint(weight / safe), -127, 127).astype(np.int8)
    return codes, scales


def row_quantized_matmul(
    prefix: str, x: str, codes: str, scales: str, output: str, residual: bool = False
) -> list[onnx.NodeProto]:
    """output = x @ (codes * scales) with x [.., S, K] quantized to uint8 around 128, one scale per row:
    MatMulInteger's exact int32 sums times the row's and the column's scales (ROW_CONSTANTS by name).
    `residual`: each row's rounding error too, as S more rows of the same call (see the module's docstring)."""
    p = f"{prefix}_rowq_"

    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=p + out.removeprefix(p), **attrs)

    nodes = [
        node("Abs", [x], p + "abs"),
        node("ReduceMax", [p + "abs", "rowq_axis"], p + "max", keepdims=1),
        node("Mul", [p + "max", "rowq_inv127"], p + "row_scale_raw"),  # [.., 1]
        node("Max", [p + "row_scale_raw", "rowq_tiny"], p + "row_scale"),
        node("Div", [x, p + "row_scale"], p + "scaled"),  # within ±127
        node("QuantizeLinear", [p + "scaled", "rowq_unit", "rowq_zero_point"], p + "codes"),  # round, +128
    ]
    rows, sums = p + "codes", p + "sums_f"
    if residual:
        nodes += [
            node("DequantizeLinear", [p + "codes", "rowq_unit", "rowq_zero_point"], p + "rounded"),
            node("Sub", [p + "scaled", p + "rounded"], p + "error"),  # exact, within ±0.5
            node("QuantizeLinear", [p + "error", "rowq_residual_step", "rowq_zero_point"], p + "error_codes"),
            node("Concat", [p + "codes", p + "error_codes"], p + "both", axis=-2),  # [.., 2S, K]
        ]
        rows, sums = p + "both", p + "both_sums_f"
    nodes += [
        node("MatMulInteger", [rows, codes, "rowq_zero_point"], p + "sums"),
        node("Cast", [p + "sums"], sums, to=TensorProto.FLOAT),
    ]
    if residual:
        nodes += [
            helper.make_node(
                "Split", [sums], [p + "main_sums", p + "error_sums"], name=p + "split", axis=-2, num_outputs=2
            ),
            node("Mul", [p + "error_sums", "rowq_residual_step"], p + "error_part"),
            node("Add", [p + "main_sums", p + "error_part"], p + "sums_f"),
        ]
    nodes.append(node("Mul", [p + "sums_f", p + "row_scale"], p + "row_scaled"))
    nodes.append(helper.make_node("Mul", [p + "row_scaled", scales], [output], name=p + "out"))
    return nodes
