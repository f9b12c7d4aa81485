"""Tied embeddings stored once: the token Gather reads the lm_head's quantized blocks (whole-graph quantizer)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .nodes import attribute, quantized_gather
from .rewrites import drop_unused_initializers


def tied_embeddings(model: onnx.ModelProto) -> dict[str, str]:
    """{token Gather's output: MatMul's output} where the Gather's table is the transpose of the MatMul's
    weight (tied embeddings: the lm_head is the embedding table)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    weights: dict[tuple[int, ...], list[tuple[str, onnx.TensorProto]]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            weight = initializers[node.input[1]]
            weights.setdefault(tuple(weight.dims), []).append((node.output[0], weight))
    tied = {}
    for node in graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or attribute(node, "axis", 0) != 0:
            continue
        candidates = weights.get(tuple(table.dims[::-1]), [])
        if candidates:
            rows = numpy_helper.to_array(table)
            for output, weight in candidates:
                if np.array_equal(numpy_helper.to_array(weight), rows.T):
                    tied[node.output[0]] = output
                    break
    return tied


def share_tied_embeddings(
    model: onnx.ModelProto, tied: dict[str, str], corrected: dict[str, tuple[str, str, str]] | None = None
) -> int:
    """Rewrite each tied token Gather as GatherBlockQuantized over its lm_head MatMulNBits' own blocks and
    scales (`nodes.quantized_gather`), dropping the fp32 table; return how many. An lm_head in `corrected`
    (`quantize_offset_lossless`) adds its offsets to each row's blocks."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    nodes, shared = [], 0
    for node in graph.node:
        output = tied.get(node.output[0], "")
        output, offsets, _ = (corrected or {}).get(output, (output, None, None))
        head = producers.get(output)
        if head is None or head.op_type != "MatMulNBits" or any(head.input[3:]):
            nodes.append(node)  # not quantized, or with zero points or a bias: keep the fp32 Gather
            continue
        k, n, bits, block = (attribute(head, name, 0) for name in ("K", "N", "bits", "block_size"))
        if k % block:
            nodes.append(node)  # a padded last block would need cutting off: keep the fp32 Gather
            continue
        prefix = f"{node.name or node.output[0]}_shared"
        gather, inits = quantized_gather(
            prefix, head.input[1], head.input[2], offsets, node.input[1], node.output[0], k, n, bits, block
        )
        nodes += gather
        graph.initializer.extend(inits)
        shared += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    return shared
