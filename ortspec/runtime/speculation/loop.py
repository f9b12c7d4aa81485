"""The speculative loop: propose, verify all proposals in one target call, keep what the target agrees with.

The target cache always holds every committed token but the last. A round feeds the target
[last committed, d1..dγ]; its logits at those γ+1 positions judge d1..dγ and give one token of its
own after the accepted prefix. Both caches are then rolled back to the committed sequence, and each
round checks that they hold it (as llama.cpp's explicit `seq_rm` does): a cache out of step with
the sequence raises `CacheStateError` instead of decoding on from the wrong context.
With no proposer (or γ = 0) the same loop is plain decoding: one token per target call.
The target state may hold a prefix of the prompt from an earlier sequence (the state pool's prefix
cache): only the rest of the prompt is fed, and its last token always is, for the first logits.

Greedy decoding keeps the longest prefix equal to the target's argmax choices. Sampling uses the
rule of Leviathan et al. (2023) / Chen et al. (2023): accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from norm(max(0, p_i - q_i)); if all are
accepted draw the bonus token from p_{γ+1}. The output distribution is exactly the target's.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.draft_length import DraftLength, DraftLengthPolicy
from ortspec.runtime.speculation.proposal import Proposal, Proposer
from ortspec.runtime.speculation.sampling import sample


@dataclass
class LoopStats:
    """Counters of one generation, filled in as the loop runs."""

    target_calls: int = 0
    cached_tokens: int = 0  # prompt tokens the target state held already: not fed again
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)
    undrafted_rounds: int = 0  # rounds decoded plainly although drafting was on (auto γ = 0, no proposal)
    finish_reason: str = ""  # "eos" or "length" (the pipeline adds "stop")


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
    target: DecoderState,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Collection[int],
    chooser: TokenChooser,
    proposer: Proposer | None = None,
    draft_length: DraftLengthPolicy | None = None,
    stats: LoopStats | None = None,
) -> Generator[list[int], None, None]:
    """Yield the committed new tokens round by round: the target's own greedy sequence, or a sample
    from exactly the target's (processed) distribution."""
    stats = stats if stats is not None else LoopStats()
    draft_length = draft_length if draft_length is not None else DraftLength(4)
    tokens = list(prompt)
    stats.cached_tokens = target.reuse(tokens)  # a prefix the state holds already (a prefix cache) is not fed again
    if proposer is not None:
        proposer.reset()
    generated = 0
    logits = target.forward(tokens[stats.cached_tokens :], last_only=True)[-1:]
    stats.target_calls += 1
    proposal = Proposal([])
    held_back: list[int] = []  # drafted tokens not sent to the target
    last_round: tuple[float, int] | None = None  # (start, drafts) of the latest round
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
        target.check(tokens, 0, len(tokens) - 1)
        if held_back:
            draft_length.judge_held_back(held_back[0] == own)
        now = time.perf_counter()
        if last_round is not None:  # its whole cycle: catch-up, calls, verification, the consumer's work
            draft_length.observe(last_round[1], (now - last_round[0]) * 1000, len(tokens))
        proposal, held_back = Proposal([]), []
        if proposer is not None:
            proposer.accept(tokens)
            proposer.rollback(tokens)
            budget = max_new_tokens - generated - 1
            count = min(draft_length.next(len(tokens), budget, proposer.pending(tokens)), budget)
            if count > 0:
                drafted = proposer.propose(tokens, count, chooser)
                proposal = drafted.prefix(draft_length.choose(drafted, len(tokens)))
                held_back = drafted.tokens if not proposal.tokens else []  # unsent: judged by the target's own token
            if budget > 0 and not proposal.tokens:
                stats.undrafted_rounds += 1
        logits = target.forward([tokens[-1], *proposal.tokens])
        stats.target_calls += 1
        last_round = (now, len(proposal.tokens))
