"""GGUF block bytes read straight into MatMulNBits' terms: integer codes, a scale per block and, where the
format has a minimum, a float offset per block. No float32 detour and no search.

Every type read here is value = scale * code + offset in each block along a row:

    Q4_0  d * (q - 8)          codes q - 8,  block 32          Q8_0  d * q    codes q, block 32
    Q5_0  d * (q - 16)         codes q - 16, block 32
    Q4_1  d * q + m            codes q - 8,  offset m + 8d     Q5_1  d * q + m   codes q - 16, offset m + 16d
    Q4_K  d*sc * q - dmin*mn   codes q - 8,  scale d*sc, offset 8 d*sc - dmin*mn   (sub-blocks of 32)
    Q5_K  d*sc * q - dmin*mn   codes q - 16, scale d*sc, offset 16 d*sc - dmin*mn  (sub-blocks of 32)
    Q6_K  d*sc * (q - 32)      codes q - 32, scale d*sc, block 16
    Q3_K  d*sc * q'            codes q' (-4..3), scale d*sc, block 16 (6-bit signed sc)

d, m, dmin are fp16 and sc a 6-bit (K-quants) or 8-bit (Q6_K) integer, so scale and scale * code are
exact in float32 and the symmetric types give gguf's own values bit for bit. An offset is one float32
rounding of the exact real (the Q4_1/Q5_1 ones are exact whenever m and d are within 2^13 of each
other, as llama.cpp writes them), so scale * code + offset is within one rounding of the value there.
Codes are centred (q - 8, q - 16) rather than 0..15: MatMulNBits' int8 kernel quantizes activations per
block, and that error scales with the stored weight, so the part moved into the offset, computed in
float (`nodes.offset_correction`), should be the larger one.

A GGUF tensor [N, K] holds its blocks along K, as MatMulNBits' B [N, K/block, ...] does: no transpose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

QK_K = 256  # elements in a K-quant super-block
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGML types that hold values, not blocks


@dataclass(frozen=True)
class Layout:
    """How a GGML type is kept: code width, block along K, whether blocks carry an offset."""

    bits: int
    block: int
    offsets: bool


LAYOUTS = {
    "Q4_0": Layout(4, 32, False),
    "Q8_0": Layout(8, 32, False),
    "Q5_0": Layout(8, 32, False),
    "Q4_1": Layout(4, 32, True),
    "Q5_1": Layout(8, 32, True),
    "Q4_K": Layout(4, 32, True),
    "Q5_K": Layout(8, 32, True),
    "Q6_K": Layout(8, 16, False),
    "Q3_K": Layout(4, 16, False),
}


def joined_layout(kinds: Sequence[str]) -> Layout | None:
    """The one layout that holds every type in `kinds` exactly (widest codes, smallest block), or None."""
    if not kinds or any(kind not in LAYOUTS for kind in kinds):
        return None
    layouts = [LAYOUTS[kind] for kind in kinds]
    return Layout(max(x.bits for x in layouts), min(x.block for x in layouts), any(x.offsets for x in layouts))


@dataclass(frozen=True)
class Blocks:
    """Rows of a weight as value = scales * codes + offsets, per block along the row."""

    codes: np.ndarray  # int8 [rows, K/block, block]
    scales: np.ndarray  # float32 [rows, K/block]
    offsets: np.ndarray | None  # float32 [rows, K/block]; None: symmetric

    @property
    def block(self) -> int:
        return self.codes.shape[-1]

    def split(self, block: int) -> Blocks:
        """The same values in blocks of `block` (a divisor of this block): scales and offsets repeated."""
        if block == self.block:
            return self
        times, rows = self.block // block, self.codes.shape[0]
        return Blocks(
            self.codes.reshape(rows, -1, block),
            np.repeat(self.scales, times, axis=1),
            None if self.offsets is None else np.repeat(self.offsets, times, axis=1),
        )

    def values(self) -> np.ndarray:
        """The float32 rows [rows, K] these blocks hold (for checks)."""
        values = self.codes.astype(np.float32) * self.scales[..., None]
        if self.offsets is not None:
            values += self.offsets[..., None]
        return values.reshape(self.codes.shape[0], -1)


def _halves(packed: np.ndarray, width: int) -> np.ndarray:
    """4-bit codes from bytes, ggml's order: each run of `width` bytes holds `width` elements in its low
    nibbles, then the next `width` in its high ones."""
    n = packed.shape[0]
    nibbles = packed.reshape(n, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (nibbles & np.uint8(15)).reshape(n, -1)


def _fp16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: bit j of the little-endian u32 qh is element j's."""
    bits = qh.view(np.uint32).reshape(-1, 1) >> np.arange(count, dtype=np.uint32).reshape(1, count)
    return (bits & np.uint32(1)).astype(np.uint8)


def _offsets(scales: np.ndarray, center: int, minimum: np.ndarray) -> np.ndarray:
    """center * scale + minimum, one float32 rounding of the exact real (scale and minimum are exact)."""
    return (scales.astype(np.float64) * center + minimum.astype(np.float64)).astype(np.float32)


def _legacy(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 blocks [n, bytes] -> codes [n, 32], scales [n], offsets [n] or None."""
    d = _fp16(raw[:, :2].copy())[:, 0]
    if kind == "Q8_0":
        return raw[:, 2:].view(np.int8), d, None
    m = _fp16(raw[:, 2:4].copy())[:, 0] if kind in ("Q4_1", "Q5_1") else None
    rest = raw[:, 2 if m is None else 4 :]
    if kind in ("Q5_0", "Q5_1"):
        q = _halves(rest[:, 4:], 16) | (_high_bits(rest[:, :4].copy(), 32) << np.uint8(4))
        center = 16
    else:
        q, center = _halves(rest, 16), 8
    codes = q.view(np.int8)
    codes -= np.int8(center)
    return codes, d, None if m is None else _offsets(d, center, m)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: d * sc and dmin * mn per sub-block of 32 ([n, 8] each)."""
    from gguf.quants import Q4_K

    d, dmin = _fp16(raw[:, :2].copy()), _fp16(raw[:, 2:4].copy())
    sc, mn = Q4_K.get_scale_min(raw[:, 4:16].copy())
    return d * sc.astype(np.float32), dmin * mn.astype(np.float32)


def _k_quants(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q4_K, Q5_K, Q6_K super-blocks [n, bytes] -> codes [n, subs, sub], scales [n, subs], offsets or None."""
    n = raw.shape[0]
    if kind == "Q3_K":  # hmask[32], qs[64], 12 bytes of 6-bit scales, d; a clear hmask bit subtracts 4
        hmask, qs, packed = raw[:, :32], raw[:, 32:96], raw[:, 96:108]
        low = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
        high = (packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
        sc = ((low & np.uint8(15)) | ((high & np.uint8(3)) << np.uint8(4))).view(np.int8) - np.int8(32)
        scales = _fp16(raw[:, -2:].copy()) * sc.astype(np.float32)
        shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        ql = (qs.reshape(n, -1, 1, 32) >> shifts).reshape(n, 16, 16) & np.uint8(3)
        qh = (hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(n, 16, 16)
        codes = ql.view(np.int8) - (((qh & np.uint8(1)) ^ np.uint8(1)) << np.uint8(2)).view(np.int8)
        return codes, scales, None
    if kind == "Q6_K":
        ql, qh = raw[:, : QK_K // 2], raw[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
        sc = raw[:, QK_K * 3 // 4 : QK_K * 3 // 4 + 16].view(np.int8).astype(np.float32)
        scales = _fp16(raw[:, -2:].copy()) * sc
        low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
        high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        q = low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << np.uint8(4))
        codes = q.view(np.int8)
        codes -= np.int8(32)
        return codes.reshape(n, 16, 16), scales, None
    scales, minimum = _k_scales(raw)
    if kind == "Q4_K":
        q, center = _halves(raw[:, 16:], 32), 8
    else:  # Q5_K: the fifth bit of element 32 i + l is bit i of qh[l]
        qh, qs = raw[:, 16:48], raw[:, 48:]
        high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q, center = _halves(qs, 32) | (high.reshape(n, -1) << np.uint8(4)), 16
    codes = q.view(np.int8)
    codes -= np.int8(center)
    codes = codes.reshape(n, 8, 32)
    return codes, scales, _offsets(scales, center, -minimum)


def read_blocks(raw: np.ndarray, kind: str) -> Blocks:
    """Rows of a GGUF tensor of GGML type `kind` (a key of LAYOUTS) from their bytes [rows, bytes per row]."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    _, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rows = raw.shape[0]
    flat = np.ascontiguousarray(raw, np.uint8).reshape(-1, type_bytes)
    codes, scales, offsets = (_k_quants if kind.endswith("_K") else _legacy)(flat, kind)
    block = LAYOUTS[kind].block
    codes, scales = codes.reshape(rows, -1, block), scales.reshape(rows, -1)
    if kind in ("Q4_0", "Q5_0", "Q8_0"):  # the types the float32 search keeps
        codes, scales = _canonical(codes, scales)
    return Blocks(np.ascontiguousarray(codes), scales, None if offsets is None else offsets.reshape(rows, -1))


def _canonical(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blocks of 32 with their largest code (the first) negative and zero blocks as zero codes and
    +0.0 scale: the form `gguf_blocks.lossless_blocks` finds from float32 (scale = largest value / -2^(bits-1)
    or the next level down), so a package stays the same whichever way a weight is stored. ONNX Runtime's
    int8 kernel sums unsigned codes and corrects by the zero point, so negated codes round differently."""
    high, low = codes.max(-1).astype(np.int16), codes.min(-1).astype(np.int16)
    flip = high > -low  # a flipped block has no -128: -low < high <= 127
    ties = np.flatnonzero((high == -low) & (high > 0))
    if len(ties):  # +v and -v both largest: the first of them decides
        tied = codes.reshape(-1, codes.shape[-1])[ties].astype(np.int16)
        first = np.take_along_axis(tied, np.abs(tied).argmax(-1)[:, None], -1)[:, 0]
        flip.reshape(-1)[ties] = first > 0
    codes = np.where(flip[..., None], -codes, codes)
    zero = scales == 0
    if zero.any():
        codes[zero] = 0
    return codes, np.where(flip, -scales, scales) + np.float32(0)  # -0.0 + 0.0 is +0.0


def join(parts: Sequence[Blocks], layout: Layout) -> Blocks:
    """Blocks of several weights stacked row after row in one `layout` (`joined_layout` of their types)."""
    parts = [part.split(layout.block) for part in parts]
    offsets = None
    if layout.offsets:
        offsets = np.concatenate([np.zeros_like(p.scales) if p.offsets is None else p.offsets for p in parts])
    if len(parts) == 1:
        return Blocks(parts[0].codes, parts[0].scales, offsets)
    return Blocks(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), offsets)


def take(blocks: Blocks, order: np.ndarray) -> Blocks:
    """Rows `order` of `blocks`, -1 giving a zero row (padding)."""
    if np.array_equal(order, np.arange(blocks.codes.shape[0])):
        return blocks
    keep, zero = np.maximum(order, 0), (order < 0)[:, None]
    codes = np.where(zero[..., None], np.int8(0), blocks.codes[keep])
    scales = np.where(zero, np.float32(0), blocks.scales[keep])
    offsets = None if blocks.offsets is None else np.where(zero, np.float32(0), blocks.offsets[keep])
    return Blocks(codes, scales, offsets)


@dataclass(frozen=True)
class GGUFWeight:
    """A MatMul weight W [K, N] whose columns are rows of GGUF block tensors.

    The quantizer stores `columns(start, stop)` (those rows as Blocks) where its layout allows, else
    quantizes `fallback()`: the weight as the builder reads it otherwise (float32, or a table read by rows).
    """

    shape: tuple[int, int]
    sources: tuple[str, ...]  # the GGUF tensors it is made of
    kinds: tuple[str, ...]  # their GGML types
    read: Callable[[int, int], Blocks] | None  # rows [start, stop) as Blocks; None: a type not read here
    fallback: Callable[[], Any]

    @property
    def layout(self) -> Layout | None:
        return joined_layout(self.kinds) if self.read is not None else None

    def columns(self, start: int, stop: int) -> Blocks:
        assert self.read is not None
        return self.read(start, stop)


def whole(read: Callable[[], Blocks]) -> Callable[[int, int], Blocks]:
    """A `GGUFWeight.read` over blocks made once, when first asked (a layer's weight, not a table)."""
    made = cache(read)
    return lambda start, stop: _rows(made(), start, stop)


def _rows(blocks: Blocks, start: int, stop: int) -> Blocks:
    if start == 0 and stop == blocks.codes.shape[0]:
        return blocks
    return Blocks(
        blocks.codes[start:stop],
        blocks.scales[start:stop],
        None if blocks.offsets is None else blocks.offsets[start:stop],
    )


def rearranged(arrange: Callable[..., np.ndarray], parts: Sequence[Any]) -> Any:
    """`arrange` (a rearrangement of columns along the last axis: select, zero-pad, concatenate) applied to
    the weights `parts` [K, N_i]: to the float32 arrays, or, if every part is a GGUFWeight, as a row order
    over their joined blocks (`arrange` run on column numbers finds it)."""
    if not all(isinstance(part, GGUFWeight) for part in parts):
        return arrange(*(part.fallback() if isinstance(part, GGUFWeight) else part for part in parts))
    ends = np.cumsum([part.shape[1] for part in parts])
    numbers = [np.arange(end - part.shape[1], end)[None, :] + 1 for end, part in zip(ends, parts, strict=True)]
    order = arrange(*numbers)[0] - 1  # zero padding becomes -1
    kinds = tuple(kind for part in parts for kind in part.kinds)
    layout = joined_layout(kinds)
    read = None
    if layout is not None and all(part.read is not None for part in parts):
        read = whole(lambda: take(join([part.columns(0, part.shape[1]) for part in parts], layout), order))
    return GGUFWeight(
        (parts[0].shape[0], len(order)),
        tuple(source for part in parts for source in part.sources),
        kinds,
        read,
        lambda: arrange(*(part.fallback() for part in parts)),
    )
