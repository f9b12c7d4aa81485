"""How many tokens to draft each round (γ): the policy interface, and the fixed and adaptive policies.
Auto γ, which predicts throughput from this machine's calibrated costs, is in `auto_length.py`."""

from __future__ import annotations

from typing import Protocol

from ortspec.runtime.speculation.proposal import Proposal


class DraftLengthPolicy(Protocol):
    """Chooses γ before each round, and hears how the round went.

    The loop calls, each round: `next` (γ to propose), `choose` (how many proposed tokens to send),
    then after the verdict `update` (drafted, accepted), `judge_held_back` (a probe's guess that was
    not sent, against the target's own token) and `observe` (the round's measured time).
    """

    @property
    def cap(self) -> int:
        """The most drafts a round may ask for."""
        ...

    def next(self, context: int, remaining: int = 1 << 30, pending: int = 0) -> int:
        """γ for the coming round at `context` tokens, `remaining` tokens before the end, `pending` tokens the
        drafter must still catch up on."""
        ...

    def choose(self, proposal: Proposal, context: int) -> int:
        """How many of the proposed tokens to send."""
        ...

    def update(self, drafted: int, accepted: int) -> None:
        """The verdict on the round's drafts."""
        ...

    def judge_held_back(self, right: bool) -> None:
        """Whether a guess that was held back (not sent) matched the target's own token."""
        ...

    def observe(self, drafted: int, measured_ms: float, context: int) -> None:
        """The whole round's measured time, with the number of drafts it sent."""
        ...


class DraftLength:
    """γ per round: fixed, or adapted from acceptance (+2 after a fully accepted round, -1 otherwise)."""

    def __init__(self, fixed: int | None, maximum: int = 8, start: int = 4) -> None:
        self.fixed = fixed
        self.maximum = maximum
        self.current = fixed if fixed is not None else min(start, maximum)

    @property
    def cap(self) -> int:
        return self.current

    def next(self, context: int, remaining: int = 1 << 30, pending: int = 0) -> int:
        return self.current

    def choose(self, proposal: Proposal, context: int) -> int:
        """How many of the proposed tokens to send: all of them (γ was fixed before proposing)."""
        return len(proposal.tokens)

    def observe(self, drafted: int, measured_ms: float, context: int) -> None:
        """Round timings only matter to `AutoDraftLength`."""

    def judge_held_back(self, right: bool) -> None:
        """Probes held back only happen in `AutoDraftLength`."""

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is not None or drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.current + 2, self.maximum)
        else:
            self.current = max(1, self.current - 1)
