"""Token choice under one sampling config and random stream: the target and the draft share it, so a
sampled draft and its verification read the same distribution rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ortspec.runtime.speculation.sampling import SamplingConfig, probabilities, sample


class TokenChooser:
    """Picks tokens from logits under one sampling config and random stream (draft and target share it)."""

    def __init__(self, config: SamplingConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng

    @property
    def greedy(self) -> bool:
        return self.config.greedy

    def history(self, tokens: Sequence[int], drafts: Sequence[int]) -> Sequence[int]:
        """The sequence so far, only built when a processor needs it (repetition penalty)."""
        return [*tokens, *drafts] if self.config.repetition_penalty != 1.0 else ()

    def probs(self, logits: np.ndarray, seen: Sequence[int]) -> np.ndarray:
        return probabilities(logits, self.config, seen)

    def choose(self, logits: np.ndarray, seen: Sequence[int]) -> int:
        if self.config.greedy and self.config.repetition_penalty == 1.0:
            return int(np.argmax(logits))
        probs = self.probs(logits, seen)
        return int(np.argmax(probs)) if self.config.greedy else sample(probs, self.rng)
