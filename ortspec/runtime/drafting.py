"""Draft proposers: cheap guesses of the next tokens, for the target to verify in one call.

A draft model and prompt lookup live here; suffix drafting (with a pool across generations) in `suffix.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .decoder import DecoderState
from .sampling import sample

if TYPE_CHECKING:
    from .speculative import TokenChooser


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

    def prefix(self, count: int) -> Proposal:
        """The first `count` proposed tokens."""
        if count >= len(self.tokens):
            return self
        probs = None if self.probs is None else self.probs[:count]
        confidence = None if self.confidence is None else self.confidence[:count]
        return Proposal(self.tokens[:count], probs, confidence)


class Proposer(Protocol):
    """Proposes up to `count` tokens that may follow `tokens`; told afterwards what was committed."""

    calls: int

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        """Guess up to `count` next tokens after the committed sequence `tokens`."""
        ...

    def rollback(self, tokens: Sequence[int]) -> None:
        """Forget state beyond what agrees with the committed `tokens`."""
        ...

    def pending(self, tokens: Sequence[int]) -> int:
        """Committed tokens the proposer must still read before it can propose (its catch-up)."""
        ...

    def reset(self) -> None:
        """Start a new sequence."""
        ...

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A generation finished: proposers that draft from earlier outputs keep what they need."""
        ...


def _softmax_max(logits: np.ndarray) -> float:
    """Largest probability of softmax(logits): the draft's confidence in its top token."""
    shifted = np.exp(logits - logits.max())
    return float(1.0 / shifted.sum())


class DraftModelProposer:
    """A small causal LM that drafts one cached call per token, greedily or by sampling.

    When sampling, each draft is drawn from the draft's processed distribution (same temperature,
    top-k, top-p, ... as the target) and that distribution is returned for the acceptance ratio.
    `vocab_limit` is the vocabulary shared with the target: a draft with extra padding rows never
    proposes a token the target cannot have. If the target commits a token the draft cannot embed
    (one of the target's own padding rows), drafting stops for the rest of that sequence.
    `min_prob` stops a round early once the draft's top probability falls below it.

    Catching up on more than `window` tokens (the prompt, or a stretch decoded without drafts)
    restarts the draft on the last `window` tokens alone: reading all of them would cost more than
    the drafts save, and a draft is only a guess (the target verifies every token), so a shorter
    context can lower acceptance but never change the output.
    """

    lag = 0  # the proposer's cache holds committed positions [offset, offset + length) of tokens[lag:]

    def __init__(
        self, decoder: DecoderState, vocab_limit: int | None = None, min_prob: float = 0.0, window: int = 64
    ) -> None:
        self.decoder = decoder
        self.vocab_limit = min(vocab_limit or decoder.vocab_size, decoder.vocab_size)
        self.min_prob = min_prob
        self.window = window
        self.calls = 0
        self._disabled = False
        self._offset = 0  # committed tokens before the draft cache's first position

    def reset(self) -> None:
        self.decoder.reset()
        self._disabled = False
        self._offset = 0

    def pending(self, tokens: Sequence[int]) -> int:
        return min(len(tokens) - self.lag - self._offset - self.decoder.length, self.window)

    def _read(self, tokens: Sequence[int], start: int, end: int) -> np.ndarray:
        """Logits after catching up on committed positions [start, end)."""
        return self.decoder.forward(tokens[start:end], last_only=True)

    def _step(self, token: int) -> np.ndarray:
        """Logits after reading one drafted token."""
        return self.decoder.forward([token])

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        end = len(tokens) - self.lag
        if end - self._offset - self.decoder.length > self.window:
            self.decoder.reset()
            self._offset = end - self.window
        start = self._offset + self.decoder.length
        count = min(count, self.decoder.max_length - (end - self._offset) + 1)
        if self._disabled or count <= 0 or start >= end:
            return Proposal([])
        if max(tokens[start + self.lag :]) >= self.decoder.vocab_size:
            self._disabled = True
            return Proposal([])
        drafts: list[int] = []
        probs: list[np.ndarray] = []
        logits = self._read(tokens, start, end)[-1, : self.vocab_limit]
        self.calls += 1
        while True:
            seen = chooser.history(tokens, drafts)
            if chooser.greedy:
                confidence = _softmax_max(logits) if self.min_prob > 0 else 1.0
                token = chooser.choose(logits, seen)
            else:
                q = chooser.probs(logits, seen)
                confidence = float(q.max())
                token = sample(q, chooser.rng)
                probs.append(q)
            if confidence < self.min_prob:
                probs = probs[: len(drafts)]
                break
            drafts.append(token)
            if len(drafts) == count:
                break
            logits = self._step(token)[-1, : self.vocab_limit]
            self.calls += 1
        return Proposal(drafts, None if chooser.greedy else probs)

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        pass

    def rollback(self, tokens: Sequence[int]) -> None:
        # The draft cache holds the committed prefix plus drafts; keep what still agrees. The last
        # committed token (the target's own) is never in it yet.
        self.decoder.truncate(max(0, min(self.decoder.length, len(tokens) - 1 - self._offset)))
        self._check(tokens)

    def _check(self, tokens: Sequence[int]) -> None:
        """After a rollback the cache holds committed tokens only, the last one excepted (some may
        still be pending): raise CacheStateError otherwise."""
        start = self._offset + self.lag
        self.decoder.check(tokens, start, min(start + self.decoder.length, len(tokens) - 1))


class FeatureHeadProposer(DraftModelProposer):
    """An EAGLE-style head: drafts from the target's own features instead of reading tokens afresh.

    Head position j reads the target's final features f_j and token x_{j+1} and predicts f_{j+1},
    whose scores (the head graph's logits) guess x_{j+2}; while drafting, its own predicted
    features stand in for the target's. Every target call already computes the features of the
    positions it reads, so after each round the head keeps those of the committed positions and
    re-reads them in place of its predictions: its cache only ever holds what the target saw.
    A head that reads fused features (final, then inner layers) gets its prediction of the final
    ones with zeros for the rest, as it was trained. It only ever re-reads the last `window`
    positions' features, so it keeps those alone, in a ring (a few hundred KB however long the text).
    """

    lag = 1  # head position j pairs f_j with x_{j+1}

    def __init__(
        self,
        head: DecoderState,
        target: DecoderState,
        vocab_limit: int | None = None,
        min_prob: float = 0.0,
        window: int = 64,
    ) -> None:
        super().__init__(head, vocab_limit, min_prob, window)
        if not (target.keep_hidden and head.keep_hidden and head.feature_size):
            raise ValueError("a draft head needs the target's and its own hidden_states, and a features input")
        if target.model.hidden_size != head.feature_size:
            raise ValueError(
                f"the draft head reads {head.feature_size} features per token, the target gives "
                f"{target.model.hidden_size}: export the package again with the head (`ortspec export --draft`)"
            )
        self.target = target
        self._features = np.zeros((window, head.feature_size), np.float32)  # position p in row p % window
        self._predicted = np.zeros((1, head.feature_size), np.float32)  # its latest predicted features
        self._real = 0  # head positions read with the target's features (the rest held drafts)

    def reset(self) -> None:
        super().reset()
        self._real = 0

    def rollback(self, tokens: Sequence[int]) -> None:
        start, hidden = self.target.hidden_start, self.target.hidden
        end = min(start + len(hidden), len(tokens) - 1)  # features of committed positions only
        first = max(start, end - self.window)
        self._features[self._rows(first, end)] = hidden[first - start : end - start]
        self.decoder.truncate(min(self.decoder.length, self._real))
        self._check(tokens)

    def _read(self, tokens: Sequence[int], start: int, end: int) -> np.ndarray:
        logits = self.decoder.forward(
            tokens[start + 1 : end + 1], self._features[self._rows(start, end)], last_only=True
        )
        self._real = self.decoder.length
        self._keep_prediction()
        return logits

    def _rows(self, start: int, end: int) -> np.ndarray:
        """The ring's rows of positions [start, end) (at most `window` of them)."""
        return np.arange(start, end) % self.window

    def _step(self, token: int) -> np.ndarray:
        logits = self.decoder.forward([token], self._predicted)
        self._keep_prediction()
        return logits

    def _keep_prediction(self) -> None:
        """Its latest predicted final features feed its next step (a fused head's inner parts stay zero)."""
        self._predicted[:, : self.decoder.model.hidden_size] = self.decoder.hidden[-1:]


class NgramProposer:
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
        self.calls = 0
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
