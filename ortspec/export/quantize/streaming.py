"""Quantize the builder's weights one at a time, while the graph is built: each fp32 weight becomes its
blocks (written to the package's external data by the graph builder) and is dropped, so the export never
holds the fp32 model, nor a whole-model proto for a quantizer to copy.

A GGUF weight (`gguf_raw.GGUFWeight`) is stored from the file's own blocks: codes, scales and offsets read
from its bytes (`gguf_raw`), at the file's width and block where `bits` and `block_size` cannot hold them
exactly (Q8_0 in a 4-bit export, Q6_K's blocks of 16). What cannot be read so (a type not read directly,
`keep_gguf_blocks=False`, a weight the builder pads along K) is quantized from float32 as any other weight.

Per float32 weight, the same choice as the whole-graph quantizer (`proto.quantize_weights`) makes, in its
order: GGUF blocks found exactly at `bits`, then (`keep_gguf_blocks`) at 8 bits or as Q4_1 blocks with their
offset correction, else ONNX Runtime's own block quantizer (the same kernel, so the same codes).
With `int8_kernel="gemm"` (8 bits), the decoder layers' projections are int8 per output column through
MatMulInteger instead (`int8_gemm`): cheaper calls of many positions. `lm_head_kernel="gemm"` (any bits) puts
the lm_head there too, as its own int8 copy: a tied embedding's lookup keeps its blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from .compact import compact_blocks
from .gguf_blocks import lossless_blocks, offset_blocks, pack
from .gguf_raw import FLOAT_TYPES, Blocks, GGUFWeight, Layout
from .int8_gemm import RESIDUAL_CONSTANTS, ROW_CONSTANTS, column_int8, row_quantized_matmul
from .nodes import block_means, matmul_nbits, offset_correction, quantized_gather


class Graph(Protocol):
    """What the quantizer needs of the graph builder: its nodes and initializers, and to add a constant."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]

    def constant(self, name: str, array: np.ndarray) -> str: ...


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight W [K, N] as MatMulNBits blocks and scales (+ block * offsets [K/block, N] for blocks with an
    offset: GGUF Q4_1, K-quants)."""

    name: str
    blocks: str
    scales: str
    offsets: str | None
    k: int
    n: int
    bits: int
    kind: str  # "exact", "exact-8bit", "exact-offset" or "quantized"
    block: int = 32


INT8_KERNELS = ("nbits", "gemm")  # also the lm_head's choices
CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32: a large table (the embedding) is quantized a slice at a time


class Columns(Protocol):
    """A weight W [K, N] read a range of columns at a time (`weights.TableColumns`: a table in its file)."""

    shape: tuple[int, int]

    def columns(self, start: int, stop: int) -> np.ndarray: ...


Weight = np.ndarray | Columns | GGUFWeight
REQUANTIZED_NAMES = 12  # re-quantized GGUF tensors named in the summary (the count is always there)


def by_columns(
    fit: Callable[[Any], tuple[np.ndarray, ...] | None], weight: Weight, column_axes: tuple[int, ...] = (0, 0, 1)
):
    """`fit` (blocks, scales[, offsets [K/block, N]]) of W [K, N] computed on slices of its columns and joined,
    or None if any slice does not fit. Blocks run along K within a column, so slicing changes no result;
    it bounds the temporaries of a large table to a slice's (and a `Columns` table's reading too). A GGUFWeight's
    slices are its Blocks. `column_axes`: the axis of each of fit's arrays that runs over the columns."""
    k, n = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    pieces = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        piece = fit(weight[:, start:stop] if isinstance(weight, np.ndarray) else weight.columns(start, stop))
        if piece is None:
            return None
        pieces.append(piece)
    if len(pieces) == 1:
        return pieces[0]
    joined = zip(column_axes, zip(*pieces, strict=True), strict=False)
    return tuple(np.concatenate(parts, axis=axis) for axis, parts in joined)


class StreamingQuantizer:
    """Writes each MatMul weight as MatMulNBits blocks (and token tables as GatherBlockQuantized) as it comes.

    `untied_embedding=False` keeps an untied embedding table in fp32 (as the whole-graph quantizer does).
    `int8_kernel`: "nbits" (MatMulNBits for every weight) or "gemm" (8 bits only: `int8_gemm` for the
    projections of the decoder layers, the weights the builder names `layers.*`). `lm_head_kernel`: the same
    choice for the lm_head (`lm_head.weight`), at any bits: "gemm" stores it int8 per column, a copy of its own
    where the embedding is tied (the lookup keeps the blocks), so each position's logits are independent of
    the call's other positions and a call of many costs about one."""

    def __init__(
        self,
        bits: int,
        block_size: int = 32,
        accuracy_level: int = 4,
        keep_gguf_blocks: bool = True,
        untied_embedding: bool = True,
        int8_kernel: str = "nbits",
        lm_head_kernel: str = "nbits",
    ):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization supports 4 or 8 bits, not {bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
        for what, kernel in (("int8", int8_kernel), ("lm_head", lm_head_kernel)):
            if kernel not in INT8_KERNELS:
                raise ValueError(f"{what} kernel must be one of {', '.join(INT8_KERNELS)}, got {kernel!r}")
        if int8_kernel == "gemm" and bits != 8:
            raise ValueError(f"the int8 GEMM kernel needs 8-bit weights, not {bits}-bit")
        self.int8_kernel, self.lm_head_kernel = int8_kernel, lm_head_kernel
        self.bits, self.block_size, self.accuracy_level = bits, block_size, accuracy_level
        self.keep_gguf_blocks = keep_gguf_blocks
        self.untied_embedding = untied_embedding  # quantize an embedding table that is not the lm_head too
        config = DefaultWeightOnlyQuantConfig(block_size, True, accuracy_level, bits=bits)
        self._ort = DefaultWeightOnlyQuantizer(config)
        self._means: dict[tuple[str, int], str] = {}  # (input, block) -> its block means (offset corrections)
        self._row_constants: set[str] = set()  # those of `int8_gemm` in the graph
        self.kinds: list[str] = []  # of each MatMul's weight
        self.embedding = "fp32 Gather"
        self.gguf_kept: dict[str, int] = {}  # GGUF weights stored with the file's blocks, by GGML type(s)
        self.gguf_requantized: list[str] = []  # GGUF block weights quantized again: "tensor (type)"
        self.gguf_from_float: dict[str, int] = {}  # GGUF F16/F32 weights quantized, by type

    def store(self, g: Graph, name: str, weight: Weight) -> QuantizedWeight:
        """Add the blocks of W [K, N] to the graph as initializers; the fp32 weight can then be dropped."""
        k, n = weight.shape
        source = None
        if isinstance(weight, GGUFWeight):
            layout = self.gguf_layout(weight)
            if layout is not None:
                found = by_columns(lambda blocks: matmul_blocks(blocks, layout), weight)
                kind = "exact-offset" if layout.offsets else "exact-8bit" if layout.bits > self.bits else "exact"
                self._record(weight, kept=True)
                return self._constants(g, name, found, k, n, layout.bits, layout.block, kind)
            source, weight = weight, weight.fallback()
        found = by_columns(lambda w: lossless_blocks(w, self.bits, self.block_size), weight)
        bits, kind = self.bits, "exact"
        if found is None and self.keep_gguf_blocks and self.bits < 8:
            found, bits, kind = by_columns(lambda w: lossless_blocks(w, 8, self.block_size), weight), 8, "exact-8bit"
        if found is None and self.keep_gguf_blocks:
            found = by_columns(lambda w: offset_blocks(w, self.bits, self.block_size), weight)
            bits, kind = self.bits, "exact-offset"
        if found is None:
            found = by_columns(lambda w: self._ort.qbits_block_quant(np.ascontiguousarray(w, np.float32))[:2], weight)
            bits, kind = self.bits, "quantized"
        assert found is not None  # ONNX Runtime's quantizer fits any weight
        if source is not None:
            self._record(source, kept=kind != "quantized")
        return self._constants(g, name, found, k, n, bits, self.block_size, kind)

    def _constants(
        self, g: Graph, name: str, found: tuple[np.ndarray, ...], k: int, n: int, bits: int, block: int, kind: str
    ) -> QuantizedWeight:
        blocks = g.constant(f"{name}_Q{bits}", found[0])
        offsets = found[2] * np.float32(block) if len(found) == 3 else None
        if kind == "quantized":  # ONNX Runtime's float32 scales: no shorter exact form
            scales = g.constant(f"{name}_scales", found[1])
            return QuantizedWeight(name, blocks, scales, None, k, n, bits, kind, block)
        constants = compact_blocks(name, found[1], offsets, block)
        for array_name, array in constants.arrays.items():
            g.constant(array_name, array)
        g.nodes += constants.nodes
        offsets_name = None if offsets is None else f"{name}_offsets"
        return QuantizedWeight(name, blocks, f"{name}_scales", offsets_name, k, n, bits, kind, block)

    def gguf_layout(self, weight: GGUFWeight) -> Layout | None:
        """How the GGUF blocks of `weight` are stored exactly, or None to quantize it from float32.

        Kept (`keep_gguf_blocks`): at `bits` or the file's wider codes, in blocks of `block_size` or the
        file's smaller ones (a block splits exactly; two blocks of different scales never join). Otherwise
        only blocks that `bits` and `block_size` hold as they are, without offsets."""
        layout = weight.layout
        if layout is None:
            return None
        block = min(layout.block, self.block_size)
        if self.keep_gguf_blocks:
            return Layout(max(layout.bits, self.bits), block, layout.offsets)
        if layout.offsets or layout.bits > self.bits or block < self.block_size:
            return None
        return Layout(self.bits, block, False)

    def _record(self, weight: GGUFWeight, kept: bool) -> None:
        """Note how a GGUF weight was stored, for the summary."""
        label = "+".join(sorted(set(weight.kinds)))
        if kept:
            self.gguf_kept[label] = self.gguf_kept.get(label, 0) + 1
        elif all(kind in FLOAT_TYPES for kind in weight.kinds):
            self.gguf_from_float[label] = self.gguf_from_float.get(label, 0) + 1
        else:
            self.gguf_requantized.append(f"{'+'.join(weight.sources)} ({label})")

    def apply(self, g: Graph, x: str, q: QuantizedWeight) -> str:
        """x @ W through the blocks of `q` (with its Q4_1 correction); returns the output's name."""
        out = f"{q.name}_out"  # as the graph builder names an fp32 MatMul's output
        product = f"{out}_nbits" if q.offsets else out
        g.nodes.append(
            matmul_nbits(
                f"{q.name}_Q{q.bits}", x, [q.blocks, q.scales], product, q.k, q.n, q.bits, q.block,
                self.accuracy_level,
            )
        )  # fmt: skip
        self.kinds.append(q.kind)
        if q.offsets:
            if (x, q.block) not in self._means:
                g.nodes.append(block_means(x, q.block))
                self._means[x, q.block] = g.nodes[-1].output[0]
            g.nodes += offset_correction(q.name, self._means[x, q.block], product, q.offsets, out)
        return out

    def matmul(self, g: Graph, x: str, name: str, weight: Weight) -> str:
        if self.on_gemm(name):
            return self.gemm(g, x, name, weight)
        return self.apply(g, x, self.store(g, name, weight))

    def on_gemm(self, name: str) -> bool:
        """Whether the weight the builder calls `name` goes through the int8 GEMM."""
        if name == "lm_head.weight":
            return self.lm_head_kernel == "gemm"
        return self.int8_kernel == "gemm" and name.startswith("layers.")

    def gemm(self, g: Graph, x: str, name: str, weight: Weight) -> str:
        """x @ W through int8 codes per output column and MatMulInteger, activations scaled per row (a GGUF
        weight's blocks are dequantized and quantized again per column). Every row carries its rounding
        error too (`residual`): with one int8 scale per row alone, activations with outliers cost SmolLM2-135M
        9% of its top-1 tokens (91.0% against 96.8%) and a call's rows differed from one-position steps by
        whole logits (2.46 against 0.023)."""
        if isinstance(weight, GGUFWeight):
            self._record(weight, kept=False)
            weight = weight.fallback()
        for constant, array in (ROW_CONSTANTS | RESIDUAL_CONSTANTS).items():
            if constant not in self._row_constants:
                self._row_constants.add(g.constant(constant, array))
        codes, scales = by_columns(column_int8, weight, column_axes=(1, 0))
        out = f"{name}_out"  # as the graph builder names an fp32 MatMul's output
        g.nodes += row_quantized_matmul(
            name,
            x,
            g.constant(f"{name}_int8", codes),
            g.constant(f"{name}_column_scales", scales),
            out,
            residual=True,
        )
        self.kinds.append("int8-gemm")
        return out

    def gather(self, g: Graph, q: QuantizedWeight, ids: str, shared: bool) -> str | None:
        """Rows `ids` of the table [N, K] whose transpose `q` holds, or None if its blocks cannot be gathered."""
        if q.k % q.block:
            return None  # a padded last block would need cutting off
        out = f"{q.name}_rows"
        nodes, inits = quantized_gather(out, q.blocks, q.scales, q.offsets, ids, out, q.k, q.n, q.bits, q.block)
        g.nodes += nodes
        g.initializers += inits
        self.embedding = f"int{q.bits} GatherBlockQuantized" + (", shared with the lm_head" if shared else "")
        return out

    def summary(self) -> dict[str, Any]:
        """The manifest's `quantization` record, as `proto.quantize_weights` writes it."""
        exact = [kind for kind in self.kinds if kind not in ("quantized", "int8-gemm")]
        gemm_nodes = self.kinds.count("int8-gemm")
        return (
            {
                "method": "matmul_nbits",
                "bits": self.bits,
                "block_size": self.block_size,
                "accuracy_level": self.accuracy_level,
                "symmetric": True,
                "ops": ["MatMul"],
                "gemm_rewritten": 0,
                "quantized_nodes": len(self.kinds),
                "lossless_nodes": len(exact),
                "lossless_offset_nodes": exact.count("exact-offset"),
                "lossless_8bit_nodes": exact.count("exact-8bit"),
                "embedding": self.embedding,
                "unquantized_matmuls": 0,
            }
            | ({"int8_kernel": "gemm"} if self.int8_kernel == "gemm" else {})
            | ({"int8_gemm_nodes": gemm_nodes} if gemm_nodes else {})
            | {"lm_head_kernel": self.lm_head_kernel}
            | self.gguf_summary()
        )

    def gguf_summary(self) -> dict[str, Any]:
        """{"gguf_blocks": ...}: the GGUF weights kept exactly (by GGML type), those quantized again (a count and
        the first names) and the float ones quantized; empty for other sources."""
        if not (self.gguf_kept or self.gguf_requantized or self.gguf_from_float):
            return {}
        requantized = self.gguf_requantized
        return {
            "gguf_blocks": {
                "kept_exactly": dict(sorted(self.gguf_kept.items())),
                "requantized": len(requantized),
                "requantized_tensors": requantized[:REQUANTIZED_NAMES],
                "quantized_from_float": dict(sorted(self.gguf_from_float.items())),
            }
        }


def matmul_blocks(blocks: Blocks, layout: Layout) -> tuple[np.ndarray, ...]:
    """MatMulNBits' B [N, K/block, block*bits/8] and scales [N, K/block] (+ offsets [K/block, N]) of GGUF rows,
    codes moved by MatMulNBits' default zero point 2^(bits-1)."""
    blocks = blocks.split(layout.block)
    codes = blocks.codes  # int8; + 2^(bits-1) as uint8: + 8 in int8 (4 bits), the top bit flipped (8 bits)
    unsigned = (codes + np.int8(8)).view(np.uint8) if layout.bits == 4 else codes.view(np.uint8) ^ np.uint8(128)
    packed = pack(unsigned, layout.bits)
    if not layout.offsets:
        return packed, blocks.scales
    offsets = np.zeros_like(blocks.scales) if blocks.offsets is None else blocks.offsets
    return packed, blocks.scales, np.ascontiguousarray(offsets.T)


def describe_gguf_blocks(quantization: dict[str, Any]) -> str | None:
    """One line on how a GGUF's weights were stored: "GGUF weights: 19 kept exactly (14 Q4_K, 5 Q6_K); 1
    re-quantized: blk.0.ffn_down.weight (Q3_K)", or None for other sources."""
    record = quantization.get("gguf_blocks")
    if not record:
        return None
    kept = record["kept_exactly"]
    by_type = f" ({', '.join(f'{n} {k}' for k, n in kept.items())})" if kept else ""
    parts = [f"{sum(kept.values())} kept exactly{by_type}"]
    if record["requantized"]:
        names, count = record["requantized_tensors"], record["requantized"]
        more = f" and {count - len(names)} more" if count > len(names) else ""
        parts.append(f"{count} re-quantized: {', '.join(names)}{more}")
    else:
        parts.append("none re-quantized")
    floats = record.get("quantized_from_float") or {}
    if floats:
        parts.append("quantized from " + ", ".join(f"{k}: {n}" for k, n in floats.items()))
    return "GGUF weights: " + "; ".join(parts)
