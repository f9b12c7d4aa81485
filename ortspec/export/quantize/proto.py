"""Weight-only quantization of a whole ONNX graph (the exports of optimum, draft heads, fp16 packages):
MatMul weights -> MatMulNBits (int4/int8, block-wise, symmetric).

Beyond ONNX Runtime's quantizer: GGUF block weights are kept with their own codes (`gguf_blocks`), and a
tied embedding table is stored once (`tied`). The builder's graphs quantize weight by weight while they
are built instead (`streaming`), without ever holding the fp32 model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .gguf_blocks import lossless_blocks, offset_blocks
from .nodes import attribute, block_means, count_ops, matmul_nbits, offset_correction
from .rewrites import drop_unused_initializers, fold_weight_transposes, gemm_to_matmul
from .tied import share_tied_embeddings, tied_embeddings


def store_blocks(graph: onnx.GraphProto, weight: onnx.TensorProto, bits: int, block_size: int) -> list[str] | None:
    """Add the `lossless_blocks` of `weight` as initializers; return their names, or None if they do not fit."""
    fit = lossless_blocks(numpy_helper.to_array(weight), bits, block_size)
    if fit is None:
        return None
    names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales"]
    graph.initializer.extend(numpy_helper.from_array(array, name) for array, name in zip(fit, names, strict=True))
    return names


def constant_matmuls(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto | None]]:
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
    for node, weight in constant_matmuls(graph):
        if weight is None:
            continue
        if weight.name not in stored:
            stored[weight.name] = None
            for width in widths:
                if (names := store_blocks(graph, weight, width, block_size)) is not None:
                    stored[weight.name] = (names, width)
                    break
        found = stored[weight.name]
        if found is None:
            continue
        names, width = found
        k, n = weight.dims
        node.CopyFrom(
            matmul_nbits(f"{node.name}_Q{width}", node.input[0], names, node.output[0], k, n, width, block_size,
                         accuracy_level)
        )  # fmt: skip
        exact[width] = exact.get(width, 0) + 1
    drop_unused_initializers(model)
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
    means: dict[str, str] = {}  # input name -> its block means
    corrected: dict[str, tuple[str, str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    for node, weight in constant_matmuls(graph):
        if weight is not None and weight.name not in stored:
            fit = offset_blocks(numpy_helper.to_array(weight), bits, block_size)
            names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales", f"{weight.name}_offsets"]
            if fit is not None:
                packed, scales, offset_values = fit
                arrays = [packed, scales, offset_values * np.float32(block_size)]
                graph.initializer.extend(
                    numpy_helper.from_array(a, name) for a, name in zip(arrays, names, strict=True)
                )
            stored[weight.name] = None if fit is None else names
        entry = None if weight is None else stored[weight.name]
        if weight is None or entry is None:
            nodes.append(node)
            continue
        *blocks, offsets = entry
        k, n = weight.dims
        x, out, p = node.input[0], node.output[0], node.name or node.output[0]
        if x not in means:
            nodes.append(block_means(x, block_size))
            means[x] = nodes[-1].output[0]
        nodes.append(
            matmul_nbits(f"{node.name}_Q{bits}", x, blocks, f"{out}_nbits", k, n, bits, block_size, accuracy_level)
        )
        nodes += offset_correction(p, means[x], f"{out}_nbits", offsets, out)
        corrected[out] = (f"{out}_nbits", offsets, f"{p}_offsets")
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    return corrected


def gather_bits(model: onnx.ModelProto) -> int:
    """The width of the (first) quantized token lookup: its lm_head's, which a GGUF may keep at 8 bits."""
    node = next(node for node in model.graph.node if node.op_type == "GatherBlockQuantized")
    return attribute(node, "bits", 4)


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
        "embedding": f"int{gather_bits(quantized)} GatherBlockQuantized, shared with the lm_head"
        if shared
        else "fp32 Gather",
        "unquantized_matmuls": count_ops(quantized, "MatMul") - len(corrected),
    }
    return quantized, summary
