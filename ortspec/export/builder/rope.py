"""Rotary embedding tables (cos/sin caches for GroupQueryAttention), computed as transformers does."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt


def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None, long: bool = False) -> np.ndarray:
    """inv_freq of the default rope over `dim` rotary dims, adjusted for llama3, linear or longrope scaling
    (float32, like PyTorch); `long` picks longrope's long factors.

    `freq_factors` divides each frequency by a given factor: llama.cpp stores Llama 3.1's scaling that
    way in GGUF files (the `rope_freqs` tensor), not as the llama3 parameters.
    """
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.power(np.float32(theta), exponents)
    if scaling is not None and scaling["rope_type"] == "longrope":
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        return (1.0 / (factors * powers)).astype(np.float32)
    inv_freq = (1.0 / powers).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "freq_factors":
        factors = np.asarray(scaling["factors"], dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"{factors.size} rope frequency factors for {inv_freq.size} frequencies")
        return (inv_freq / factors).astype(np.float32)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """Longrope scales cos and sin (so each attention score by its square); other ropes do not."""
    return float(scaling.get("attention_factor", 1.0)) if scaling else 1.0


def cos_sin_caches(
    inv_freq: np.ndarray, positions: int, padded_half: int, scale: float = 1.0, dtype: npt.DTypeLike = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """[positions, padded_half] tables times `scale`, computed in fp32 and stored as `dtype`; the columns past
    inv_freq (padding, and the dims partial rotary leaves alone) rotate by 0 and are not scaled (cos 1, sin 0)."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = np.ones((positions, padded_half), dtype=np.float32)
    sin = np.zeros((positions, padded_half), dtype=np.float32)
    cos[:, : len(inv_freq)] = np.cos(angles) * np.float32(scale)
    sin[:, : len(inv_freq)] = np.sin(angles) * np.float32(scale)
    return cos.astype(dtype), sin.astype(dtype)
