"""Suffix drafting: continue the sequence the way its longest matching suffix continued before, in
this sequence (the prompt and what has been generated) or in a pool of this pipeline's earlier outputs.

After SuffixDecoding (Oliaro et al., 2024): no model, next to no cost, and strongest where answers
repeat text (edits, rewrites, code, agent loops). Each draft token comes with its chance of being
accepted, looked up in a running table of how often drafts with the same evidence (where the match
was found, how long it is, how many earlier continuations agree) were right; the proposer drafts
only while the chance of reaching and keeping a token stays worth a verify position, and auto γ sends
the prefix with the best expected throughput on this machine's calibrated round costs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ortspec.runtime.drafters.token_index import TokenIndex
from ortspec.runtime.speculation.calibration import expected_tokens
from ortspec.runtime.speculation.proposal import Proposal, Proposer

if TYPE_CHECKING:
    from ortspec.runtime.speculation.chooser import TokenChooser

POOL_TOKENS = 1 << 15  # default bound of the pool of earlier outputs (measured 17 MB full of random tokens)
LEAD = 16  # prompt tokens kept before each pooled output, so that an answer's opening can be matched
LOCAL, POOL = 0, 1  # where a match was found
MATCH_CLASSES = (1, 2, 3, 5, 9, 17)  # lower bounds of the match-length classes
SHARES = 4  # share classes: < 1/2 of the continuations agree, < all, all of one, all of several


def match_class(length: int) -> int:
    return _MATCH_CLASS[min(length, MATCH_CLASSES[-1])]


_MATCH_CLASS = [sum(length >= bound for bound in MATCH_CLASSES) - 1 for length in range(MATCH_CLASSES[-1] + 1)]


def share_class(agreeing: int, support: int) -> int:
    if agreeing < support:
        return 0 if 2 * agreeing < support else 1
    return 2 if support == 1 else 3


def bucket(source: int, length: int, agreeing: int, support: int) -> int:
    """The evidence class of one draft token: source, match length (the occurrence matched `length`
    tokens before it) and how many of the `support` continuations there agree with it."""
    return bucket_index(source, match_class(length), share_class(agreeing, support))


def bucket_index(source: int, length_class: int, share: int) -> int:
    return (source * len(MATCH_CLASSES) + length_class) * SHARES + share


class ConfidenceBuckets:
    """Running chance that a draft of each evidence class is accepted, given the drafts before it were.

    Starts from a prior that grows with the match length and the agreement of the continuations, then
    follows what the target actually accepted (each class forgets slowly, to follow the text).
    """

    PRIOR_STRENGTH = 2.0
    DECAY = 0.99
    SHARE_PRIOR = (0.35, 0.7, 0.9, 1.0)

    def __init__(self) -> None:
        size = 2 * len(MATCH_CLASSES) * SHARES
        self.accepted = [0.0] * size
        self.judged = [0.0] * size
        self.prior = [0.0] * size
        for source in (LOCAL, POOL):
            for length_class, length in enumerate(MATCH_CLASSES):
                for share in range(SHARES):
                    prior = self.SHARE_PRIOR[share] * length / (length + 2)
                    self.prior[bucket_index(source, length_class, share)] = prior

    def chance(self, index: int) -> float:
        strength = self.PRIOR_STRENGTH
        return (self.accepted[index] + strength * self.prior[index]) / (self.judged[index] + strength)

    def observe(self, index: int, accepted: bool) -> None:
        self.accepted[index] = self.DECAY * self.accepted[index] + accepted
        self.judged[index] = self.DECAY * self.judged[index] + 1


@dataclass
class SuffixMemory:
    """What suffix drafting keeps across one pipeline's generations: earlier outputs (bounded; the
    oldest are evicted first) and how often each evidence class of drafts was accepted. Concurrent
    generations share it: every use holds `lock`."""

    pool: TokenIndex = field(default_factory=lambda: TokenIndex(POOL_TOKENS))
    confidence: ConfidenceBuckets = field(default_factory=ConfidenceBuckets)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def remember(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Pool a finished generation's output, with the end of its prompt as the context it began in."""
        if output:
            with self.lock:
                self.pool.add([*prompt[-LEAD:], *output])


@dataclass
class Candidate:
    """Draft tokens from one source, with each token's evidence class and chance of acceptance."""

    tokens: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    chances: list[float] = field(default_factory=list)


class SuffixProposer(Proposer):
    """Drafts the continuation of the longest suffix match, from the current sequence or the pool.

    The current sequence is indexed incrementally as it grows; the pool holds earlier outputs of the
    same pipeline (`SuffixMemory`). Of the two candidates, the one with more expected accepted tokens
    wins, the current sequence on ties. Where several earlier occurrences match, each draft token is
    their most frequent continuation, and the draft follows only the occurrences that agree with it.
    Each round learns from what the target committed: every candidate token up to the first that
    differs is scored, sent or not, so the chances stay calibrated even while nothing is sent.
    """

    MIN_CHANCE = 0.15  # stop drafting where the chance of reaching and keeping a token falls below this
    LIMIT = 16  # occurrences looked at per lookup: a round's work stays small however large the pool

    def __init__(self, memory: SuffixMemory) -> None:
        self.memory = memory
        self.reset()

    def reset(self) -> None:
        self._local = TokenIndex()
        self._latest: tuple[int, Candidate] | None = None  # (position, candidate) awaiting the target's verdict

    def pending(self, tokens: Sequence[int]) -> int:
        return 0

    def accept(self, tokens: Sequence[int]) -> None:
        """Score the latest candidate's tokens against what was committed after it."""
        if self._latest is None:
            return
        position, candidate = self._latest
        self._latest = None
        with self.memory.lock:
            for offset, (draft, index) in enumerate(zip(candidate.tokens, candidate.buckets, strict=True)):
                if position + offset >= len(tokens):
                    break
                accepted = tokens[position + offset] == draft
                self.memory.confidence.observe(index, accepted)
                if not accepted:
                    break

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.memory.remember(prompt, output)

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        if len(tokens) < self._local.tokens:  # not the sequence indexed so far: start over
            self._local = TokenIndex()
        self._local.extend(tokens[self._local.tokens :])
        with self.memory.lock:
            local = self._candidate(self._local, tokens, count, LOCAL)
            pooled = self._candidate(self.memory.pool, tokens, count, POOL)
        best = pooled if expected_tokens(pooled.chances) > expected_tokens(local.chances) else local
        self._latest = (len(tokens), best)
        keep, reach = 0, 1.0
        for chance in best.chances:
            reach *= chance
            if reach < self.MIN_CHANCE:
                break
            keep += 1
        return Proposal(best.tokens[:keep], confidence=best.chances[:keep])

    def _candidate(self, index: TokenIndex, tokens: Sequence[int], count: int, source: int) -> Candidate:
        """Up to `count` tokens continuing the longest match of `tokens`' suffix in `index`.

        In the current sequence, a continuation that reaches its end reads on into the drafts chosen so
        far (they are what the sequence would then be): a repeating stretch drafts past one period.
        """
        matches = index.find(tokens, self.LIMIT)
        candidate = Candidate()
        alive = [(start, index.continuation(start, count)) for start in matches.starts]
        for offset in range(count):
            if source == LOCAL:
                for start, continuation in alive:
                    if len(continuation) == offset and start + offset >= index.end:
                        continuation.append(candidate.tokens[start + offset - index.end])
            alive = [(start, continuation) for start, continuation in alive if len(continuation) > offset]
            if not alive:
                break
            tally: dict[int, int] = {}
            for _, continuation in alive:
                tally[continuation[offset]] = tally.get(continuation[offset], 0) + 1
            token = max(tally, key=tally.__getitem__)  # on a tie, the latest occurrence's
            kind = bucket(source, matches.length + offset, tally[token], len(alive))
            candidate.tokens.append(token)
            candidate.buckets.append(kind)
            candidate.chances.append(self.memory.confidence.chance(kind))
            alive = [(start, continuation) for start, continuation in alive if continuation[offset] == token]
        return candidate
