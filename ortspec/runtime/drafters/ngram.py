"""Prompt lookup: drafts the tokens that followed the latest earlier occurrence of the sequence's last n-gram."""

from __future__ import annotations

from collections.abc import Sequence

from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.proposal import Proposal, Proposer


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    `max_ngram_size` down to 1) and propose what followed it. No model, next to no cost; strong on
    input-grounded tasks (editing, summarising, code that repeats names).

    An index of every n-gram's latest end position grows with the committed sequence (which only
    grows between resets), so a round costs a few dict lookups, not a scan of the whole sequence.
    """

    def __init__(self, max_ngram_size: int = 3) -> None:
        if max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be >= 1, got {max_ngram_size}")
        self.max_ngram_size = max_ngram_size
        self.reset()

    def reset(self) -> None:
        self._follows: dict[tuple[int, ...], int] = {}  # n-gram -> where the tokens after its latest occurrence start
        self._indexed = 0  # n-grams ending before this position are in the index

    def rollback(self, tokens: Sequence[int]) -> None:
        pass

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        pass

    def pending(self, tokens: Sequence[int]) -> int:
        return 0

    def _index(self, tokens: Sequence[int]) -> None:
        """Add the n-grams ending before the last token (the suffix itself is not an earlier occurrence)."""
        if len(tokens) - 1 < self._indexed:  # not the sequence indexed so far: start over
            self.reset()
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(1, min(self.max_ngram_size, end + 1) + 1):
                self._follows[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        self._index(tokens)
        for n in range(min(self.max_ngram_size, len(tokens) - 1), 0, -1):
            start = self._follows.get(tuple(tokens[-n:]))
            if start is not None:
                return Proposal([int(t) for t in tokens[start : start + count]])
        return Proposal([])
