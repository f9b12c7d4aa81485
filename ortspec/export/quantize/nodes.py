"""The nodes that compute with block-quantized weights: MatMulNBits, its offset correction (GGUF Q4_1) and
the token lookup over the same blocks (GatherBlockQuantized), shared by the whole-graph quantizer and the
builder's streaming one so both write the same graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def matmul_nbits(name: str, x: str, blocks: list[str], output: str, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int) -> onnx.NodeProto:  # fmt: skip
    """y = x @ W for W [K, N] given as MatMulNBits' B and scales (`blocks`; default zero point 2^(bits-1))."""
    return helper.make_node(
        "MatMulNBits",
        [x, *blocks],
        [output],
        name=name,
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


def block_means(x: str, block_size: int) -> onnx.NodeProto:
    """x's mean over each block of its last axis ([.., K] -> [.., K/block]): one AveragePool, for x [B, S, K]."""
    return helper.make_node(
        "AveragePool", [x], [f"{x}_block_means"], name=f"{x}_block_means", kernel_shape=[block_size],
        strides=[block_size],
    )  # fmt: skip


def offset_correction(prefix: str, means: str, product: str, offsets: str, output: str) -> list[onnx.NodeProto]:
    """output = product + means @ offsets: the GGUF Q4_1 correction BlockSum(x) @ C (offsets = block * C)."""
    return [
        helper.make_node("MatMul", [means, offsets], [f"{output}_offsets"], name=f"{prefix}_offsets"),
        helper.make_node("Add", [product, f"{output}_offsets"], [output], name=f"{prefix}_corrected"),
    ]


def quantized_gather(
    prefix: str, blocks: str, scales: str, offsets: str | None, ids: str, output: str, k: int, n: int, bits: int,
    block: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:  # fmt: skip
    """Rows `ids` of the [N, K] table whose transpose MatMulNBits' `blocks` and `scales` hold (with `offsets`
    block * C [K/block, N] added, for GGUF Q4_1 blocks): GatherBlockQuantized over the same initializers.

    MatMulNBits blocks run along K for each of the N output rows, i.e. along the hidden axis of each
    vocabulary row: exactly the [vocab, hidden] table quantized along its last axis. A row's
    d * (q - 8) + C is then the same float as the table's d * q + m."""
    p = prefix
    inits = [
        numpy_helper.from_array(np.array([n, k // block, 1], np.int64), f"{p}_scales_shape"),
        numpy_helper.from_array(np.array([k], np.int64), f"{p}_hidden"),
    ]
    nodes = [
        helper.make_node("Reshape", [scales, f"{p}_scales_shape"], [f"{p}_scales"], name=f"{p}_scales"),
        helper.make_node(
            "GatherBlockQuantized",
            [blocks, ids, f"{p}_scales"],
            [f"{p}_blocks"],  # [*ids.shape, k_blocks, block]
            name=f"{p}_blocks",
            domain=MS_DOMAIN,
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=2,
        ),
    ]
    rows = f"{p}_blocks"
    if offsets is not None:  # constant Transpose, Reshape and Mul: folded when the session loads
        inits.append(numpy_helper.from_array(np.array(1 / block, np.float32), f"{p}_mean_to_sum"))
        nodes += [
            helper.make_node("Transpose", [offsets], [f"{p}_offsets_t"], name=f"{p}_offsets_t", perm=[1, 0]),
            helper.make_node(
                "Reshape", [f"{p}_offsets_t", f"{p}_scales_shape"], [f"{p}_offsets_b"], name=f"{p}_offsets_b"
            ),
            helper.make_node("Mul", [f"{p}_offsets_b", f"{p}_mean_to_sum"], [f"{p}_offsets"], name=f"{p}_offsets"),
            helper.make_node("Gather", [f"{p}_offsets", ids], [f"{p}_row_offsets"], name=f"{p}_row_offsets"),
            helper.make_node("Add", [rows, f"{p}_row_offsets"], [f"{p}_corrected"], name=f"{p}_corrected"),
        ]
        rows = f"{p}_corrected"
    nodes += [
        helper.make_node("Shape", [ids], [f"{p}_ids_shape"], name=f"{p}_ids_shape"),
        helper.make_node("Concat", [f"{p}_ids_shape", f"{p}_hidden"], [f"{p}_shape"], name=f"{p}_shape", axis=0),
        helper.make_node("Reshape", [rows, f"{p}_shape"], [output], name=f"{p}_rows"),
    ]
    return nodes, inits


def dequantized_weight(node: onnx.NodeProto, initializers: dict[str, Any]) -> np.ndarray:
    """The float [K, N] weight a MatMulNBits node without zero points multiplies by (for checks), from its
    inputs' values: TensorProtos or arrays (`compact.folded_constants`: scales computed by constant nodes)."""
    k, n, bits = attribute(node, "K", 0), attribute(node, "N", 0), attribute(node, "bits", 4)
    packed, scales = (_array(initializers[name]) for name in node.input[1:3])
    scales = scales.reshape(n, -1, 1)
    codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1)
    return ((codes.astype(np.float32) - (1 << (bits - 1))) * scales).reshape(n, -1)[:, :k].T


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """Number of nodes of `op_type` in the main graph."""
    return sum(node.op_type == op_type for node in model.graph.node)


def _array(value: Any) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value
