"""Drafting with a model: a small draft LM, or a feature-level head that reads the target's features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.proposal import Proposal, Proposer
from ortspec.runtime.speculation.sampling import sample


def _softmax_max(logits: np.ndarray) -> float:
    """Largest probability of softmax(logits): the draft's confidence in its top token."""
    shifted = np.exp(logits - logits.max())
    return float(1.0 / shifted.sum())


class DraftModelProposer(Proposer):
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

    calls = 0  # draft model calls so far
    lag = 0  # the proposer's cache holds committed positions [offset, offset + length) of tokens[lag:]

    def __init__(
        self, decoder: DecoderState, vocab_limit: int | None = None, min_prob: float = 0.0, window: int = 64
    ) -> None:
        self.decoder = decoder
        self.vocab_limit = min(vocab_limit or decoder.vocab_size, decoder.vocab_size)
        self.min_prob = min_prob
        self.window = window
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
    re-reads them in place of its predictions: its cache only ever holds what the target saw. The
    target state keeps the features of every position it holds, so a prompt prefix it reused from an
    earlier sequence (not computed in this generation) has them too.
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
        self._known = 0  # committed positions whose target features the ring has taken

    def reset(self) -> None:
        super().reset()
        self._real = 0
        self._known = 0

    def rollback(self, tokens: Sequence[int]) -> None:
        end = len(tokens) - 1  # the committed positions, all in the target's cache (a reused prefix's too)
        first = max(self._known, end - self.window)
        if first < end:
            self._features[self._rows(first, end)] = self.target.hidden_at(first, end)
        self._known = end
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
