"""Logits -> next-token probabilities (repetition penalty, temperature, top-k, top-p, min-p) in numpy.

Plain sampling, the draft and the target all go through `probabilities`, so the distributions whose
ratio speculative sampling uses are exactly the ones the tokens were drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from ortspec.runtime.options import check_option


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature 0 means greedy (argmax), everywhere."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self) -> None:  # the bounds of GenerationConfig's fields of the same names
        for f in fields(self):
            object.__setattr__(self, f.name, check_option(f.name, getattr(self, f.name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repetitions(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    ids = ids[ids < logits.shape[-1]]
    out = logits.copy()
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def probabilities(logits: np.ndarray, config: SamplingConfig, seen: Sequence[int] = ()) -> np.ndarray:
    """The processed next-token distribution of one logits row (float64, sums to 1).

    Order as in transformers: repetition penalty, temperature, top-k, top-p, min-p. Greedy configs
    give a one-hot distribution on the argmax.
    """
    logits = penalize_repetitions(np.asarray(logits, dtype=np.float64), seen, config.repetition_penalty)
    if config.greedy:
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    with np.errstate(over="ignore"):  # shifted first: a tiny temperature gives -inf, never inf - inf (NaN)
        scaled = (logits - logits.max()) / config.temperature
    if 0 < config.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -config.top_k)[-config.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        keep = order[: int(np.searchsorted(cumulative, config.top_p, side="left")) + 1]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if config.min_p > 0:
        probs = np.where(probs >= config.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a distribution (inverse CDF, one uniform draw)."""
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))
