"""Weight-only quantization: MatMul weights -> MatMulNBits (int4/int8, block-wise, symmetric).

Two things beyond ONNX Runtime's quantizer:
- Weights that already lie on a block grid (GGUF Q4_0 / Q8_0 weights, dequantized) are stored with
  exactly those scales and codes instead of being quantized a second time (`quantize_lossless`).
- A tied embedding table is stored once: the token Gather reads the lm_head's quantized blocks
  through GatherBlockQuantized instead of keeping an fp32 copy (`share_tied_embeddings`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

BITS = {"none": None, "int8": 8, "int4": 4}
MS_DOMAIN = "com.microsoft"


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


def _fit_levels(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Signed codes and one scale per block with codes * scale == blocks exactly in float32, or None.

    In a block d * q (q integer), the element of largest magnitude is d times the largest |q|, so
    dividing it by each possible level finds d (or another scale as exact) and then every code.
    """
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    levels = sorted(set(range(low, high + 1)) - {0}, key=lambda level: (-abs(level), level))
    ref = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scales = np.zeros(blocks.shape[:-1], np.float32)  # an all-zero block keeps scale 0
    codes = np.zeros(blocks.shape, np.int16)
    todo = np.flatnonzero(ref != 0)  # NaN never fits, so a NaN weight falls back to the quantizer
    flat_blocks, flat_ref = blocks.reshape(-1, blocks.shape[-1]), ref.reshape(-1)
    flat_scales, flat_codes = scales.reshape(-1), codes.reshape(-1, blocks.shape[-1])
    with np.errstate(all="ignore"):
        for level in levels:
            if len(todo) == 0:
                break
            values, scale = flat_blocks[todo], flat_ref[todo] / np.float32(level)
            q = np.rint(values / scale[:, None])
            fits = ((q >= low) & (q <= high) & (q * scale[:, None] == values)).all(-1)
            flat_scales[todo[fits]], flat_codes[todo[fits]] = scale[fits], q[fits]
            todo = todo[~fits]
    return None if len(todo) else (codes, scales)


def lossless_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """MatMulNBits' B [N, K/block, block*bits/8] and scales [N, K/block] for a MatMul weight [K, N] whose
    values already are block-quantized (scale * integer code per block of `block_size` along K), or None.

    Weights dequantized from GGUF's Q4_0 (d * (q - 8), d fp16) fit 4 bits with block 32 (or 16) and
    8 bits; Q8_0 (d * q) fits 8 bits. Storing them this way adds no quantization error.
    """
    k, n = weight.shape
    if weight.dtype != np.float32 or k % block_size:
        return None
    first = np.ascontiguousarray(weight[:, :8].T).reshape(-1, k // block_size, block_size)
    if _fit_levels(first, bits) is None:  # most weights fail at once: check a few output rows first
        return None
    fit = _fit_levels(np.ascontiguousarray(weight.T).reshape(n, k // block_size, block_size), bits)
    if fit is None:
        return None
    codes, scales = fit
    unsigned = (codes + (1 << (bits - 1))).astype(np.uint8)  # MatMulNBits' default zero point 2^(bits-1)
    packed = unsigned if bits == 8 else unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return packed, scales


def _store_blocks(graph: onnx.GraphProto, weight: onnx.TensorProto, bits: int, block_size: int) -> list[str] | None:
    """Add the `lossless_blocks` of `weight` as initializers; return their names, or None if they do not fit."""
    fit = lossless_blocks(numpy_helper.to_array(weight), bits, block_size)
    if fit is None:
        return None
    names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales"]
    graph.initializer.extend(numpy_helper.from_array(array, name) for array, name in zip(fit, names, strict=True))
    return names


def quantize_lossless(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int) -> int:
    """Replace each MatMul whose constant weight fits `lossless_blocks` by an exact MatMulNBits; return how many."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    stored: dict[str, list[str] | None] = {}  # weight name -> its blocks and scales (None: they do not fit)
    exact = 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            continue
        if weight.name not in stored:
            stored[weight.name] = _store_blocks(graph, weight, bits, block_size)
        if stored[weight.name] is None:
            continue
        k, n = weight.dims
        node.CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *stored[weight.name]],
                list(node.output),
                name=f"{node.name}_Q{bits}",
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=bits,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        )
        exact += 1
    _drop_unused_initializers(model)
    return exact


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
        if table is None or len(table.dims) != 2 or _attribute(node, "axis", 0) != 0:
            continue
        candidates = weights.get(tuple(table.dims[::-1]), [])
        if candidates:
            rows = numpy_helper.to_array(table)
            for output, weight in candidates:
                if np.array_equal(numpy_helper.to_array(weight), rows.T):
                    tied[node.output[0]] = output
                    break
    return tied


def share_tied_embeddings(model: onnx.ModelProto, tied: dict[str, str]) -> int:
    """Rewrite each tied token Gather as GatherBlockQuantized over its lm_head MatMulNBits' own blocks and
    scales (the same initializers, reshaped by the graph), dropping the fp32 table; return how many.

    MatMulNBits blocks run along K for each of the N output rows, i.e. along the hidden axis of each
    vocabulary row: exactly the [vocab, hidden] table quantized along its last axis.
    """
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    nodes, shared = [], 0
    for node in graph.node:
        head = producers.get(tied.get(node.output[0], ""))
        if head is None or head.op_type != "MatMulNBits" or any(head.input[3:]):
            nodes.append(node)  # not quantized, or with zero points or a bias: keep the fp32 Gather
            continue
        k, n, bits, block = (_attribute(head, name, 0) for name in ("K", "N", "bits", "block_size"))
        if k % block:
            nodes.append(node)  # a padded last block would need cutting off: keep the fp32 Gather
            continue
        p = f"{node.name or node.output[0]}_shared"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([n, k // block, 1], np.int64), f"{p}_scales_shape"),
                numpy_helper.from_array(np.array([k], np.int64), f"{p}_hidden"),
            ]
        )
        nodes += [
            helper.make_node("Reshape", [head.input[2], f"{p}_scales_shape"], [f"{p}_scales"], name=f"{p}_scales"),
            helper.make_node(
                "GatherBlockQuantized",
                [head.input[1], node.input[1], f"{p}_scales"],
                [f"{p}_blocks"],  # [*ids.shape, k_blocks, block]
                name=f"{p}_blocks",
                domain=MS_DOMAIN,
                bits=bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=2,
            ),
            helper.make_node("Shape", [node.input[1]], [f"{p}_ids_shape"], name=f"{p}_ids_shape"),
            helper.make_node("Concat", [f"{p}_ids_shape", f"{p}_hidden"], [f"{p}_shape"], name=f"{p}_shape", axis=0),
            helper.make_node("Reshape", [f"{p}_blocks", f"{p}_shape"], list(node.output), name=f"{p}_rows"),
        ]
        shared += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return shared


def dequantized_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float [K, N] weight a MatMulNBits node without zero points multiplies by (for checks)."""
    k, n, bits = _attribute(node, "K", 0), _attribute(node, "N", 0), _attribute(node, "bits", 4)
    packed = numpy_helper.to_array(initializers[node.input[1]])
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1, 1)
    codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1)
    return ((codes.astype(np.float32) - (1 << (bits - 1))) * scales).reshape(n, -1)[:, :k].T


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
    tied = tied_embeddings(model)
    exact = quantize_lossless(model, bits, block_size, accuracy_level)
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
    shared = share_tied_embeddings(quantized, tied)
    summary = {
        "method": "matmul_nbits",
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": True,
        "ops": ["MatMul", "Gemm"] if gemms else ["MatMul"],
        "gemm_rewritten": gemms,
        "quantized_nodes": count_ops(quantized, "MatMulNBits"),
        "lossless_nodes": exact,  # weights stored with their own block scales and codes (GGUF Q4_0/Q8_0)
        "embedding": f"int{bits} GatherBlockQuantized, shared with the lm_head" if shared else "fp32 Gather",
        "unquantized_matmuls": count_ops(quantized, "MatMul"),
    }
    return quantized, summary
