"""What a drafter hands the loop (`Proposal`), and what the loop asks of a drafter (`Proposer`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ortspec.runtime.speculation.chooser import TokenChooser


@dataclass
class Proposal:
    """Proposed tokens and, for sampled drafts, the distribution each was drawn from.

    `probs` is None for deterministic proposals (greedy drafts, prompt lookup): to the acceptance
    rule that is a one-hot distribution on the proposed token. `confidence`, from proposers that
    score their tokens, is each token's chance of acceptance given the tokens before it were
    accepted: auto γ then sends the prefix with the best expected throughput.
    """

    tokens: list[int]
    probs: list[np.ndarray] | None = None
    confidence: list[float] | None = None
    source: str = ""  # which drafter proposed, where several take turns (the hybrid's "free" or "model")

    def prefix(self, count: int) -> Proposal:
        """The first `count` proposed tokens."""
        if count >= len(self.tokens):
            return self
        probs = None if self.probs is None else self.probs[:count]
        confidence = None if self.confidence is None else self.confidence[:count]
        return Proposal(self.tokens[:count], probs, confidence, self.source)


class Proposer:
    """Proposes up to `count` tokens that may follow the committed `tokens`, and hears what the target made
    of them. Drafters override `propose` and the hooks they need; the others do nothing."""

    @property
    def calls(self) -> int:
        """Model calls made so far (free drafters make none)."""
        return 0

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        """Guess up to `count` next tokens after the committed sequence `tokens`."""
        raise NotImplementedError

    def accept(self, tokens: Sequence[int]) -> None:
        """The verdict on the latest proposal: `tokens` is the committed sequence after it (drafters that
        score their guesses learn here)."""

    def rollback(self, tokens: Sequence[int]) -> None:
        """Forget state beyond what agrees with the committed `tokens`."""

    def pending(self, tokens: Sequence[int]) -> int:
        """Committed tokens the proposer must still read before it can propose (its catch-up)."""
        return 0

    def reset(self) -> None:
        """Start a new sequence."""

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A generation finished: proposers that draft from earlier outputs keep what they need."""
