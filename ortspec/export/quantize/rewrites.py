"""Graph rewrites that let the quantizer see every constant projection weight (exports by optimum)."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .nodes import attribute


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
            attribute(node, "alpha", 1.0) == 1.0
            and attribute(node, "beta", 1.0) == 1.0
            and attribute(node, "transA", 0) == 0
        )
        if weight is None or not plain:
            nodes.append(node)
            continue
        weight_name = weight.name
        if attribute(node, "transB", 0):
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
    drop_unused_initializers(model)
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
        perm = attribute(node, "perm", list(range(array.ndim))[::-1])
        graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    return folded


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
