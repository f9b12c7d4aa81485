"""The speculative loop: propose, verify all proposals in one target call, keep what the target agrees with.

The target cache always holds every committed token but the last. A round feeds the target
[last committed, d1..dγ]; its logits at those γ+1 positions judge d1..dγ and give one token of its
own after the longest agreeing prefix. Both caches are then rolled back to the committed sequence.
With no proposer (or γ = 0) the same loop is plain greedy decoding: one token per target call.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .decoder import Decoder
from .drafting import Proposer


@dataclass
class LoopStats:
    """Counters of one generation, filled in as the loop runs."""

    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos" or "length"


def accepted_prefix(drafts: Sequence[int], target_choices: np.ndarray) -> int:
    """How many drafts agree with the target's greedy choice at their position."""
    k = 0
    while k < len(drafts) and drafts[k] == target_choices[k]:
        k += 1
    return k


def greedy_speculative(
    target: Decoder,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Collection[int],
    proposer: Proposer | None = None,
    draft_tokens: int = 4,
    stats: LoopStats | None = None,
) -> Iterator[list[int]]:
    """Yield the committed new tokens round by round, exactly the target's greedy sequence."""
    stats = stats if stats is not None else LoopStats()
    target.reset()
    if proposer is not None:
        proposer.reset()
    tokens = list(prompt)
    generated = 0
    last_logits = target.forward(tokens)[-1:]
    stats.target_calls += 1
    drafts: list[int] = []
    while True:
        choices = np.argmax(last_logits, axis=-1)
        k = accepted_prefix(drafts, choices)
        if drafts:
            stats.drafted += len(drafts)
            stats.accepted += k
            stats.accepted_per_round.append(k)
        committed = []
        for token in [*drafts[:k], int(choices[k])]:
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
        drafts = []
        if proposer is not None:
            proposer.rollback(tokens)
            drafts = proposer.propose(tokens, min(draft_tokens, max_new_tokens - generated - 1))
        last_logits = target.forward([tokens[-1], *drafts])
        stats.target_calls += 1
