"""Weights that already lie on a GGUF block grid, found exactly and stored in MatMulNBits' layout.

Weights dequantized from GGUF's Q4_0 / Q8_0 (scale * integer code per block) are stored with exactly
those scales and codes instead of being quantized a second time (`lossless_blocks`); Q4_1 weights
(d * q + m) get symmetric codes plus a float offset per block (`offset_blocks`). Either adds no error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


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


def fit_weight(weight: np.ndarray, block_size: int, fit: Callable[[np.ndarray], Any]) -> Any:
    """`fit` applied to the blocks [N, K/block, block] of a MatMul weight [K, N] (blocks run along K), or None.

    Most weights do not fit at all, so one output row is tried first.
    """
    k, n = weight.shape
    if weight.dtype != np.float32 or k % block_size:
        return None
    if fit(np.ascontiguousarray(weight[:, :1].T).reshape(-1, k // block_size, block_size)) is None:
        return None
    return fit(np.ascontiguousarray(weight.T).reshape(n, k // block_size, block_size))


def pack(unsigned: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B layout: one byte per 8-bit code, two 4-bit codes per byte (low nibble first)."""
    unsigned = unsigned.astype(np.uint8, copy=False)
    return unsigned if bits == 8 else unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def lossless_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """MatMulNBits' B [N, K/block, block*bits/8] and scales [N, K/block] for a MatMul weight [K, N] whose
    values already are block-quantized (scale * integer code per block of `block_size` along K), or None.

    Weights dequantized from GGUF's Q4_0 (d * (q - 8), d fp16) fit 4 bits with block 32 (or 16) and
    8 bits; Q8_0 (d * q) fits 8 bits. Storing them this way adds no quantization error.
    """
    fit = fit_weight(weight, block_size, lambda blocks: _fit_levels(blocks, bits))
    if fit is None:
        return None
    codes, scales = fit
    return pack(codes + (1 << (bits - 1)), bits), scales  # MatMulNBits' default zero point 2^(bits-1)


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
    fit = fit_weight(weight, block_size, _fit_offset_levels)
    if fit is None:
        return None
    codes, scales, mins = fit
    offsets = (mins + 8 * scales).T.copy()
    return pack(codes.astype(np.int16) - 8 + (1 << (bits - 1)), bits), scales, offsets
