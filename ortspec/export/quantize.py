"""Weight-only quantization: MatMul weights -> MatMulNBits (int4/int8, block-wise, symmetric).

Two things beyond ONNX Runtime's quantizer:
- Weights that already lie on a block grid (GGUF Q4_0 / Q8_0 weights, dequantized) are stored with
  exactly those scales and codes instead of being quantized a second time (`quantize_lossless`);
  so are GGUF Q4_1 weights (d * q + m), with a small correction term for the offsets m
  (`quantize_offset_lossless`).
- A tied embedding table is stored once: the token Gather reads the lm_head's quantized blocks
  through GatherBlockQuantized instead of keeping an fp32 copy (`share_tied_embeddings`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def _fit_weight(weight: np.ndarray, block_size: int, fit: Callable[[np.ndarray], Any]) -> Any:
    """`fit` applied to the blocks [N, K/block, block] of a MatMul weight [K, N] (blocks run along K), or None.

    Most weights do not fit at all, so a few output rows are tried first.
    """
    k, n = weight.shape
    if weight.dtype != np.float32 or k % block_size:
        return None
    if fit(np.ascontiguousarray(weight[:, :8].T).reshape(-1, k // block_size, block_size)) is None:
        return None
    return fit(np.ascontiguousarray(weight.T).reshape(n, k // block_size, block_size))


def _pack(unsigned: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B layout: one byte per 8-bit code, two 4-bit codes per byte (low nibble first)."""
    unsigned = unsigned.astype(np.uint8)
    return unsigned if bits == 8 else unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def lossless_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """MatMulNBits' B [N, K/block, block*bits/8] and scales [N, K/block] for a MatMul weight [K, N] whose
    values already are block-quantized (scale * integer code per block of `block_size` along K), or None.

    Weights dequantized from GGUF's Q4_0 (d * (q - 8), d fp16) fit 4 bits with block 32 (or 16) and
    8 bits; Q8_0 (d * q) fits 8 bits. Storing them this way adds no quantization error.
    """
    fit = _fit_weight(weight, block_size, lambda blocks: _fit_levels(blocks, bits))
    if fit is None:
        return None
    codes, scales = fit
    return _pack(codes + (1 << (bits - 1)), bits), scales  # MatMulNBits' default zero point 2^(bits-1)


OFFSET_LEVELS = 16  # GGUF Q4_1: 4-bit codes 0..15
# (lowest, highest) code a block's smallest and largest value may have, most likely first: llama.cpp's
# reference quantizer uses 0 and 15; its importance-matrix search may leave codes unused at either end.
_OFFSET_SPANS = sorted(
    ((low, high) for low in range(OFFSET_LEVELS) for high in range(low + 1, OFFSET_LEVELS)),
    key=lambda span: (span[0] - span[1], span[0]),
)


def _fit_offset_levels(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Codes q in 0..15 and fp16 d, m per block with d * q + m == blocks exactly in float32, or None.

    That is GGUF's Q4_1 block (dequantized as (d * q) + m in float32). If the smallest and largest
    value of a block have codes `low` and `high`, then d = (max - min) / (high - low) and
    m = min - d * low up to float32 rounding, which rounding to fp16 removes; every code then follows.
    The check also asks that m + 8d is exact in float32, so the graph's d * (q - 8) + (m + 8d) is the
    same float as the GGUF's value (d * q is exact: an fp16 times a 4-bit integer).
    """
    flat = blocks.reshape(-1, blocks.shape[-1])
    low_values, high_values = flat.min(-1), flat.max(-1)
    codes = np.zeros(flat.shape, np.uint8)
    scales, mins = np.zeros(len(flat), np.float32), np.zeros(len(flat), np.float32)
    todo = np.arange(len(flat))
    with np.errstate(all="ignore"):
        for low, high in _OFFSET_SPANS:
            if len(todo) == 0:
                break
            values = flat[todo]
            d = ((high_values[todo] - low_values[todo]) / np.float32(high - low)).astype(np.float16).astype(np.float32)
            m = (low_values[todo] - d * np.float32(low)).astype(np.float16).astype(np.float32)
            q = np.where(d[:, None] > 0, np.rint((values - m[:, None]) / d[:, None]), 0)
            exact_offset = np.float32(m + 8 * d).astype(np.float64) == m.astype(np.float64) + 8 * d.astype(np.float64)
            fits = ((q >= 0) & (q < OFFSET_LEVELS) & (d[:, None] * q + m[:, None] == values)).all(-1) & exact_offset
            codes[todo[fits]], scales[todo[fits]], mins[todo[fits]] = q[fits], d[fits], m[fits]
            todo = todo[~fits]
    if len(todo):
        return None
    shape = blocks.shape[:-1]
    return codes.reshape(blocks.shape), scales.reshape(shape), mins.reshape(shape)


def offset_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """MatMulNBits' B and scales (as `lossless_blocks`) plus offsets C [K/block, N] with
    weight == d * (code - zero point) + C exactly, for a weight of GGUF Q4_1 blocks (d * q + m), or None.

    MatMulNBits cannot hold d * q + m (its zero points are integers; float ones run ~60x slower on
    CPU), but with its default zero point z = 2^(bits-1) the weight is d * (q + z - 8 - z) + (m + 8d):
    symmetric codes plus one float C = m + 8d per block and output column, which the graph adds as
    BlockSum(x) @ C (`quantize_offset_lossless`).
    """
    fit = _fit_weight(weight, block_size, _fit_offset_levels)
    if fit is None:
        return None
    codes, scales, mins = fit
    offsets = (mins + 8 * scales).T.copy()
    return _pack(codes.astype(np.int16) - 8 + (1 << (bits - 1)), bits), scales, offsets


def _store_blocks(graph: onnx.GraphProto, weight: onnx.TensorProto, bits: int, block_size: int) -> list[str] | None:
    """Add the `lossless_blocks` of `weight` as initializers; return their names, or None if they do not fit."""
    fit = lossless_blocks(numpy_helper.to_array(weight), bits, block_size)
    if fit is None:
        return None
    names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales"]
    graph.initializer.extend(numpy_helper.from_array(array, name) for array, name in zip(fit, names, strict=True))
    return names


def _matmul_nbits(node: onnx.NodeProto, blocks: list[str], output: str, k: int, n: int, bits: int, block_size: int,
                  accuracy_level: int) -> onnx.NodeProto:  # fmt: skip
    return helper.make_node(
        "MatMulNBits",
        [node.input[0], *blocks],
        [output],
        name=f"{node.name}_Q{bits}",
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


def _constant_matmuls(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto | None]]:
    """Each node with its constant 2-D weight if it is a MatMul with one (else None)."""
    initializers = {init.name: init for init in graph.initializer}
    pairs = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        pairs.append((node, weight if weight is not None and len(weight.dims) == 2 else None))
    return pairs


def quantize_lossless(
    model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int, wider: bool = False
) -> dict[int, int]:
    """Replace each MatMul whose constant weight fits `lossless_blocks` by an exact MatMulNBits; return how
    many at each width. `wider`: a weight that does not fit `bits` but fits 8 bits (GGUF Q8_0 in a 4-bit
    export) is kept at 8 bits rather than re-quantized to 4: the file's author chose 8 bits for it."""
    graph = model.graph
    widths = [bits] + ([8] if wider and bits < 8 else [])
    stored: dict[str, tuple[list[str], int] | None] = {}  # weight -> (its blocks and scales, bits); None: no fit
    exact: dict[int, int] = {}
    for node, weight in _constant_matmuls(graph):
        if weight is None:
            continue
        if weight.name not in stored:
            stored[weight.name] = None
            for width in widths:
                if (names := _store_blocks(graph, weight, width, block_size)) is not None:
                    stored[weight.name] = (names, width)
                    break
        if stored[weight.name] is None:
            continue
        names, width = stored[weight.name]
        k, n = weight.dims
        node.CopyFrom(_matmul_nbits(node, names, node.output[0], k, n, width, block_size, accuracy_level))
        exact[width] = exact.get(width, 0) + 1
    _drop_unused_initializers(model)
    return exact


def quantize_offset_lossless(
    model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int
) -> dict[str, tuple[str, str, str]]:
    """Replace each MatMul whose constant weight fits `offset_blocks` (GGUF Q4_1) by the exact
    MatMulNBits(x) + BlockSum(x) @ C, BlockSum summing x over each block of K ([.., K] -> [.., K/block]).

    BlockSum is one AveragePool over the last axis (the block means), so the graph stores
    block_size * C (exact: a power of two). That is 4 nodes per weight where Reshape + ReduceSum
    needed 6 (Shape and Concat to build the shape): a SmolLM2 decode step measured +8-10% instead
    of +14-15% (1 thread). AveragePool needs x to be [batch, sequence, K], as every projection of the builder's graphs
    (the only ones made from GGUF files) is.

    Returns {the MatMul's output: (its MatMulNBits' output, the name of block_size * C, the name of
    the correction's MatMul node)}; the block quantizer must leave those MatMuls alone.
    """
    graph = model.graph
    stored: dict[str, list[str] | None] = {}  # weight name -> its blocks, scales and offsets (None: no fit)
    block_means: dict[str, str] = {}  # input name -> its block means
    corrected: dict[str, tuple[str, str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    for node, weight in _constant_matmuls(graph):
        if weight is not None and weight.name not in stored:
            fit = offset_blocks(numpy_helper.to_array(weight), bits, block_size)
            names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales", f"{weight.name}_offsets"]
            if fit is not None:
                packed, scales, offsets = fit
                arrays = [packed, scales, offsets * np.float32(block_size)]
                graph.initializer.extend(
                    numpy_helper.from_array(a, name) for a, name in zip(arrays, names, strict=True)
                )
            stored[weight.name] = None if fit is None else names
        if weight is None or stored[weight.name] is None:
            nodes.append(node)
            continue
        *blocks, offsets = stored[weight.name]
        k, n = weight.dims
        x, out, p = node.input[0], node.output[0], node.name or node.output[0]
        if x not in block_means:
            block_means[x] = f"{x}_block_means"
            nodes.append(
                helper.make_node(
                    "AveragePool",
                    [x],
                    [block_means[x]],
                    name=block_means[x],
                    kernel_shape=[block_size],
                    strides=[block_size],
                )
            )
        nodes += [
            _matmul_nbits(node, blocks, f"{out}_nbits", k, n, bits, block_size, accuracy_level),
            helper.make_node("MatMul", [block_means[x], offsets], [f"{out}_offsets"], name=f"{p}_offsets"),
            helper.make_node("Add", [f"{out}_nbits", f"{out}_offsets"], [out], name=f"{p}_corrected"),
        ]
        corrected[out] = (f"{out}_nbits", offsets, f"{p}_offsets")
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return corrected


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


def share_tied_embeddings(
    model: onnx.ModelProto, tied: dict[str, str], corrected: dict[str, tuple[str, str, str]] | None = None
) -> int:
    """Rewrite each tied token Gather as GatherBlockQuantized over its lm_head MatMulNBits' own blocks and
    scales (the same initializers, reshaped by the graph), dropping the fp32 table; return how many.

    MatMulNBits blocks run along K for each of the N output rows, i.e. along the hidden axis of each
    vocabulary row: exactly the [vocab, hidden] table quantized along its last axis. An lm_head in
    `corrected` (`quantize_offset_lossless`) adds its offsets C [K/block, N] (stored times block) to
    each row's blocks: the row's d * (q - 8) + C is then the same float as the table's d * q + m.
    """
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
        ]
        blocks = f"{p}_blocks"
        if offsets is not None:  # constant Transpose, Reshape and Mul: folded when the session loads
            graph.initializer.append(numpy_helper.from_array(np.array(1 / block, np.float32), f"{p}_mean_to_sum"))
            nodes += [
                helper.make_node("Transpose", [offsets], [f"{p}_offsets_t"], name=f"{p}_offsets_t", perm=[1, 0]),
                helper.make_node(
                    "Reshape", [f"{p}_offsets_t", f"{p}_scales_shape"], [f"{p}_offsets_b"], name=f"{p}_offsets_b"
                ),
                helper.make_node("Mul", [f"{p}_offsets_b", f"{p}_mean_to_sum"], [f"{p}_offsets"], name=f"{p}_offsets"),
                helper.make_node(
                    "Gather", [f"{p}_offsets", node.input[1]], [f"{p}_row_offsets"], name=f"{p}_row_offsets"
                ),
                helper.make_node("Add", [blocks, f"{p}_row_offsets"], [f"{p}_corrected"], name=f"{p}_corrected"),
            ]
            blocks = f"{p}_corrected"
        nodes += [
            helper.make_node("Shape", [node.input[1]], [f"{p}_ids_shape"], name=f"{p}_ids_shape"),
            helper.make_node("Concat", [f"{p}_ids_shape", f"{p}_hidden"], [f"{p}_shape"], name=f"{p}_shape", axis=0),
            helper.make_node("Reshape", [blocks, f"{p}_shape"], list(node.output), name=f"{p}_rows"),
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


def _gather_bits(model: onnx.ModelProto) -> int:
    """The width of the (first) quantized token lookup: its lm_head's, which a GGUF may keep at 8 bits."""
    node = next(node for node in model.graph.node if node.op_type == "GatherBlockQuantized")
    return _attribute(node, "bits", 4)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """Number of nodes of `op_type` in the main graph."""
    return sum(node.op_type == op_type for node in model.graph.node)


def quantize_weights(
    model: onnx.ModelProto, bits: int, block_size: int = 32, accuracy_level: int = 4, keep_gguf_blocks: bool = True
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize every constant MatMul weight (Gemm rewritten first); return the model and a summary.

    Weights on a block grid (GGUF) are always stored with their own codes when they fit `bits`.
    `keep_gguf_blocks` also keeps GGUF Q4_1 blocks (with their correction term) and, in a 4-bit export,
    8-bit blocks (Q8_0) at 8 bits; False re-quantizes those to `bits`: faster steps, further from the file.

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
    exact = quantize_lossless(model, bits, block_size, accuracy_level, wider=keep_gguf_blocks)
    corrected = quantize_offset_lossless(model, bits, block_size, accuracy_level) if keep_gguf_blocks else {}
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
        nodes_to_exclude=[name for _, _, name in corrected.values()],
    )
    quantizer.process()
    quantized = quantizer.model.model
    shared = share_tied_embeddings(quantized, tied, corrected)
    summary = {
        "method": "matmul_nbits",
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": True,
        "ops": ["MatMul", "Gemm"] if gemms else ["MatMul"],
        "gemm_rewritten": gemms,
        "quantized_nodes": count_ops(quantized, "MatMulNBits"),
        "lossless_nodes": sum(exact.values()) + len(corrected),  # weights kept with their own block codes (GGUF)
        "lossless_offset_nodes": len(corrected),  # of those, GGUF Q4_1 ones with a block-sum correction
        "lossless_8bit_nodes": exact.get(8, 0) if bits != 8 else 0,  # of those, 8-bit ones in a 4-bit export
        "embedding": f"int{_gather_bits(quantized)} GatherBlockQuantized, shared with the lm_head"
        if shared
        else "fp32 Gather",
        "unquantized_matmuls": count_ops(quantized, "MatMul") - len(corrected),
    }
    return quantized, summary
