"""The speculative loop: propose, verify all proposals in one target call, keep what the target agrees with.

The target cache always holds every committed token but the last. A round feeds the target
[last committed, d1..dγ]; its logits at those γ+1 positions judge d1..dγ and give one token of its
own after the accepted prefix. Both caches are then rolled back to the committed sequence.
With no proposer (or γ = 0) the same loop is plain decoding: one token per target call.

Greedy decoding keeps the longest prefix equal to the target's argmax choices. Sampling uses the
rule of Leviathan et al. (2023) / Chen et al. (2023): accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from norm(max(0, p_i - q_i)); if all are
accepted draw the bonus token from p_{γ+1}. The output distribution is exactly the target's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .calibration import Calibration
from .decoder import Decoder
from .drafting import Proposal, Proposer
from .sampling import SamplingConfig, probabilities, sample


@dataclass
class LoopStats:
    """Counters of one generation, filled in as the loop runs."""

    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)
    undrafted_rounds: int = 0  # rounds decoded plainly although drafting was on (auto γ = 0, no proposal)
    finish_reason: str = ""  # "eos" or "length" (the pipeline adds "stop")


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


class DraftLength:
    """γ per round: fixed, or adapted from acceptance (+2 after a fully accepted round, -1 otherwise)."""

    def __init__(self, fixed: int | None, maximum: int = 8, start: int = 4) -> None:
        self.fixed = fixed
        self.maximum = maximum
        self.current = fixed if fixed is not None else min(start, maximum)

    def next(self, context: int) -> int:
        """γ for the coming round, `context` positions into the sequence."""
        return self.current

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is not None or drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.current + 2, self.maximum)
        else:
            self.current = max(1, self.current - 1)


class AcceptanceEstimate:
    """Running estimate of the per-draft acceptance rate α, kept across generations.

    Drafts after a round's first rejection are never judged, so α is estimated as accepted /
    (accepted + rejections) — the geometric model's maximum likelihood — with a weak prior and
    slow forgetting so that it follows the text being generated.
    """

    def __init__(self, prior: float = 0.6, strength: float = 4.0, decay: float = 0.97) -> None:
        self.accepted = prior * strength
        self.rejected = (1 - prior) * strength
        self.decay = decay

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1 if accepted < drafted else 0)


class AutoDraftLength:
    """γ each round maximising predicted throughput E(α, γ) / (γ·d + t(γ+1)) from measured costs.

    γ = 0 (plain decoding) unless some γ is predicted to beat it by 5%. After 16 plain rounds it
    probes with γ = 1 once, so that a better-than-expected draft is noticed.
    """

    PROBE_EVERY = 16

    def __init__(self, calibration: Calibration, estimate: AcceptanceEstimate, draft_cost: bool = True) -> None:
        self.calibration = calibration
        self.estimate = estimate
        self.draft_cost = draft_cost
        self._plain_rounds = 0
        self._choices: dict[tuple[float, int], int] = {}  # the choice is per round: keep it cheap

    def next(self, context: int) -> int:
        key = (round(self.estimate.alpha, 2), context // 32)
        if key not in self._choices:
            self._choices[key] = self.calibration.best_gamma(key[0], context, self.draft_cost)
        gamma = self._choices[key]
        if gamma == 0:
            self._plain_rounds += 1
            if self._plain_rounds >= self.PROBE_EVERY:
                self._plain_rounds = 0
                return 1
        return gamma

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.estimate.update(drafted, accepted)


def accept_probability(p: float, q: float) -> float:
    """min(1, p/q): the chance of keeping a draft token the draft proposed with probability q."""
    return 1.0 if q <= 0 else min(1.0, p / q)


def verify(proposal: Proposal, logits: np.ndarray, tokens: Sequence[int], chooser: TokenChooser) -> tuple[int, int]:
    """(number of drafts accepted, the target's own next token) for one verify call's logits."""
    drafts = proposal.tokens
    for i, draft in enumerate(drafts):
        seen = chooser.history(tokens, drafts[:i])
        if chooser.greedy:
            choice = chooser.choose(logits[i], seen)
            if choice != draft:
                return i, choice
            continue
        p = chooser.probs(logits[i], seen)
        q = proposal.probs[i] if proposal.probs is not None else None
        q_draft = 1.0 if q is None else float(q[draft])
        if chooser.rng.random() < accept_probability(float(p[draft]), q_draft):
            continue
        residual = p.copy()
        if q is None:
            residual[draft] = 0.0
        else:
            residual[: len(q)] = np.maximum(0.0, residual[: len(q)] - q)
        if residual.sum() <= 0:  # p <= q everywhere means p == q: the draft was always accepted
            residual = p
        return i, sample(residual / residual.sum(), chooser.rng)
    return len(drafts), chooser.choose(logits[len(drafts)], chooser.history(tokens, drafts))


def speculative_decode(
    target: Decoder,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Collection[int],
    chooser: TokenChooser,
    proposer: Proposer | None = None,
    draft_length: DraftLength | AutoDraftLength | None = None,
    stats: LoopStats | None = None,
) -> Iterator[list[int]]:
    """Yield the committed new tokens round by round: the target's own greedy sequence, or a sample
    from exactly the target's (processed) distribution."""
    stats = stats if stats is not None else LoopStats()
    draft_length = draft_length or DraftLength(4)
    target.reset()
    if proposer is not None:
        proposer.reset()
    tokens = list(prompt)
    generated = 0
    logits = target.forward(tokens)[-1:]
    stats.target_calls += 1
    proposal = Proposal([])
    while True:
        k, own = verify(proposal, logits, tokens, chooser)
        if proposal.tokens:
            stats.drafted += len(proposal.tokens)
            stats.accepted += k
            stats.accepted_per_round.append(k)
            stats.drafted_per_round.append(len(proposal.tokens))
            draft_length.update(len(proposal.tokens), k)
        committed = []
        for token in [*proposal.tokens[:k], own]:
            committed.append(token)
            generated += 1
            if token in eos_token_ids:
                stats.finish_reason = "eos"
                break
            if generated >= max_new_tokens:
                stats.finish_reason = "length"
                break
        tokens.extend(committed)
        yield committed
        if stats.finish_reason:
            return
        target.truncate(len(tokens) - 1)
        proposal = Proposal([])
        if proposer is not None:
            proposer.rollback(tokens)
            budget = max_new_tokens - generated - 1
            count = min(draft_length.next(len(tokens)), budget)
            if count > 0:
                proposal = proposer.propose(tokens, count, chooser)
            if budget > 0 and not proposal.tokens:
                stats.undrafted_rounds += 1
        logits = target.forward([tokens[-1], *proposal.tokens])
        stats.target_calls += 1
