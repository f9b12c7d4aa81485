"""Weight-only quantization: MatMul weights -> MatMulNBits (int4/int8, block-wise, symmetric)."""

from __future__ import annotations

import logging
from typing import Any

import onnx
from onnx import helper, numpy_helper

BITS = {"none": None, "int8": 8, "int4": 4}


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W, C) with a constant W as MatMul(A, W) + C, so the quantizer sees it.

    GPT-2-style exports use Gemm for every projection; MatMulNBits only replaces MatMul.
    Returns how many Gemm nodes were rewritten.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = (
            _attribute(node, "alpha", 1.0) == 1.0
            and _attribute(node, "beta", 1.0) == 1.0
            and _attribute(node, "transA", 0) == 0
        )
        if weight is None or not plain:
            nodes.append(node)
            continue
        weight_name = weight.name
        if _attribute(node, "transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), f"{weight.name}_T")
            graph.initializer.append(transposed)
            initializers[transposed.name] = transposed
            weight_name = transposed.name
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return rewritten


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) by the transposed initializer, so the quantizer sees a constant.

    Exports of tied embeddings (GPT-2's lm_head = wte.T) compute the lm_head weight at run time; as a
    constant it gets its own quantized copy (the embedding table stays for Gather). Returns how many.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, folded = [], 0
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Transpose" else None
        if source is None:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(source)
        perm = _attribute(node, "perm", list(range(array.ndim))[::-1])
        graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return folded


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """Number of nodes of `op_type` in the main graph."""
    return sum(node.op_type == op_type for node in model.graph.node)


def quantize_weights(
    model: onnx.ModelProto, bits: int, block_size: int = 32, accuracy_level: int = 4
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize every constant MatMul weight (Gemm rewritten first); return the model and a summary.

    accuracy_level 4 (int8 compute) is what makes MatMulNBits fast on CPU; without it int8 takes a
    slow path (measured ~30x slower).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if bits not in (4, 8):
        raise ValueError(f"weight-only quantization supports 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
    gemms = gemm_to_matmul(model)
    fold_weight_transposes(model)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantized = quantizer.model.model
    summary = {
        "method": "matmul_nbits",
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": True,
        "ops": ["MatMul", "Gemm"] if gemms else ["MatMul"],
        "gemm_rewritten": gemms,
        "quantized_nodes": count_ops(quantized, "MatMulNBits"),
        "unquantized_matmuls": count_ops(quantized, "MatMul"),
    }
    return quantized, summary
