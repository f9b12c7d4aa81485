"""Draft proposers: cheap guesses of the next tokens, for the target to verify in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .decoder import Decoder


class Proposer(Protocol):
    """Proposes up to `count` tokens that may follow `tokens`; told afterwards what was committed."""

    calls: int

    def propose(self, tokens: Sequence[int], count: int) -> list[int]:
        """Guess up to `count` next tokens after the committed sequence `tokens`."""
        ...

    def rollback(self, tokens: Sequence[int]) -> None:
        """Forget state beyond what agrees with the committed `tokens`."""
        ...

    def reset(self) -> None:
        """Start a new sequence."""
        ...


class DraftModelProposer:
    """A small causal LM that drafts greedily, one cached call per token.

    `vocab_limit` is the vocabulary shared with the target: a draft with extra padding rows never
    proposes a token the target cannot have. If the target commits a token the draft cannot embed
    (one of the target's own padding rows), drafting stops for the rest of that sequence.
    """

    def __init__(self, decoder: Decoder, vocab_limit: int | None = None) -> None:
        self.decoder = decoder
        self.vocab_limit = min(vocab_limit or decoder.vocab_size, decoder.vocab_size)
        self.calls = 0
        self._disabled = False

    def reset(self) -> None:
        self.decoder.reset()
        self._disabled = False

    def propose(self, tokens: Sequence[int], count: int) -> list[int]:
        pending = list(tokens[self.decoder.length :])
        count = min(count, self.decoder.max_length - len(tokens) + 1)
        if self._disabled or count <= 0 or not pending:
            return []
        if max(pending) >= self.decoder.vocab_size:
            self._disabled = True
            return []
        drafts: list[int] = []
        logits = self.decoder.forward(pending)
        self.calls += 1
        while True:
            drafts.append(int(np.argmax(logits[-1, : self.vocab_limit])))
            if len(drafts) == count:
                return drafts
            logits = self.decoder.forward(drafts[-1:])
            self.calls += 1

    def rollback(self, tokens: Sequence[int]) -> None:
        # The draft cache holds the committed prefix plus drafts; keep what still agrees. The last
        # committed token (the target's own) is never in it yet.
        self.decoder.truncate(min(self.decoder.length, len(tokens) - 1))
