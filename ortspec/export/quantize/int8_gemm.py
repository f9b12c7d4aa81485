"""int8 weights with one scale per output column, multiplied by ONNX Runtime's int8 GEMM (MatMulInteger)
with the activations quantized to int8 per row (per position).

Why: on CPU a call of up to 16 positions then costs about what one position costs (MatMulNBits' int4
kernels grow ~1.6x by 4 positions), which is what verifying a speculative draft asks of the target
(docs/design.md, "Many positions per call"). DynamicQuantizeMatMul would run the same GEMM but with one
activation scale for the whole call, so a position's result would depend on the other positions in the
call; with a scale per row it does not, and greedy speculative output stays plain greedy output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

# Constants every row-quantized matmul reads (a graph holds them once): the reduced axis, 1/127, the
# smallest row scale (an all-zero row), and uint8's offset (MLAS's u8 x s8 kernels take unsigned rows).
ROW_CONSTANTS: dict[str, np.ndarray] = {
    "rowq_axis": np.array([-1], np.int64),
    "rowq_inv127": np.array(1 / 127, np.float32),
    "rowq_tiny": np.array(1e-12, np.float32),
    "rowq_offset": np.array(128, np.float32),
    "rowq_zero_point": np.array(128, np.uint8),
}


def column_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes [K, N] and one fp32 scale per output column [N] for a MatMul weight W [K, N]."""
    weight = np.asarray(weight, np.float32)
    scales = (np.abs(weight).max(axis=0) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))  # an all-zero column keeps codes 0 and scale 0
    codes = np.clip(np.rint(weight / safe), -127, 127).astype(np.int8)
    return codes, scales


def row_quantized_matmul(prefix: str, x: str, codes: str, scales: str, output: str) -> list[onnx.NodeProto]:
    """output = x @ (codes * scales) with x [.., K] quantized to uint8 around 128, one scale per row:
    MatMulInteger's exact int32 sums times the row's and the column's scales (ROW_CONSTANTS by name)."""
    p = f"{prefix}_rowq_"

    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=p + out.removeprefix(p), **attrs)

    return [
        node("Abs", [x], p + "abs"),
        node("ReduceMax", [p + "abs", "rowq_axis"], p + "max", keepdims=1),
        node("Mul", [p + "max", "rowq_inv127"], p + "row_scale_raw"),  # [.., 1]
        node("Max", [p + "row_scale_raw", "rowq_tiny"], p + "row_scale"),
        node("Div", [x, p + "row_scale"], p + "scaled"),
        node("Round", [p + "scaled"], p + "rounded"),
        node("Add", [p + "rounded", "rowq_offset"], p + "shifted"),  # 1..255: no saturation
        node("Cast", [p + "shifted"], p + "codes", to=TensorProto.UINT8),
        node("MatMulInteger", [p + "codes", codes, "rowq_zero_point"], p + "sums"),
        node("Cast", [p + "sums"], p + "sums_f", to=TensorProto.FLOAT),
        node("Mul", [p + "sums_f", p + "row_scale"], p + "row_scaled"),
        helper.make_node("Mul", [p + "row_scaled", scales], [output], name=p + "out"),
    ]
