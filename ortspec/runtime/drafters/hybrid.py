"""Suffix drafting where the text repeats, the draft model elsewhere: one drafter for both kinds of text.

Suffix matches cost nothing and run long where the answer repeats the prompt or earlier outputs
(edits, quotes, code); a draft model (a small LM or a feature-level head) costs a call per token but
guesses ordinary prose. Each round the hybrid asks the suffix drafter first and sends its proposal
when it is predicted to gain at least as much as the model's would; otherwise the model drafts. The
model reads every committed token either way (its catch-up), so it stays in step with the text.

`HybridProposer` is the loop's proposer and `HybridLength` its γ policy; each round the length
policy of whichever drafter proposed learns from the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ortspec.runtime.drafters.model import DraftModelProposer
from ortspec.runtime.drafters.suffix import SuffixProposer
from ortspec.runtime.speculation.auto_length import AutoDraftLength
from ortspec.runtime.speculation.calibration import expected_tokens, prefix_speedups, round_speedup
from ortspec.runtime.speculation.draft_length import DraftLength
from ortspec.runtime.speculation.proposal import Proposal, Proposer

if TYPE_CHECKING:
    from ortspec.runtime.speculation.chooser import TokenChooser

FREE, MODEL = "free", "model"  # `Proposal.source` of the two drafters
FIXED_FREE_TOKENS = 1.0  # without auto γ: send a suffix proposal expected to keep at least this many drafts


class HybridLength:
    """γ for the hybrid: each drafter keeps its own policy (suffix: scored auto γ; the model: auto,
    fixed or adaptive), and the latest round's verdict goes to the one that proposed."""

    def __init__(self, free: DraftLength | AutoDraftLength, model: DraftLength | AutoDraftLength) -> None:
        self.free = free
        self.model = model
        self.source: DraftLength | AutoDraftLength | None = None  # the policy of this round's proposer (None: nobody)
        self._round = (0, 1 << 30, 0)  # (context, remaining, pending) of the coming round

    def next(self, context: int, remaining: int = 1 << 30, pending: int = 0) -> int:
        self._round = (context, remaining, pending)
        self.source = None
        return max(self.free.next(context, remaining, 0), self.model.cap)

    @property
    def cap(self) -> int:
        return max(self.free.cap, self.model.cap)

    def model_gamma(self) -> int:
        """The model's γ for this round (0: it would not draft)."""
        return self.model.next(*self._round)

    def free_gain(self, proposal: Proposal) -> float:
        """Predicted speedup of sending the suffix `proposal` (scored by its evidence); without auto γ, its
        expected tokens per round (compared with `model_gain`'s, in the same unit)."""
        if not proposal.tokens:
            return 0.0
        free = self.free
        if not isinstance(free, AutoDraftLength):
            return expected_tokens(proposal.confidence or [])
        rounds = free.costs(self._round[0])
        slowdown = free.state.costs.coarse_slowdown
        return round_speedup(expected_tokens(proposal.confidence or []), len(proposal.tokens), rounds, slowdown)

    def model_gain(self) -> float:
        """Predicted speedup of the model drafting this round at its running acceptance rates; without auto γ,
        the expected tokens per round a suffix proposal must reach to be sent instead."""
        model = self.model
        if not isinstance(model, AutoDraftLength):
            return 1.0 + FIXED_FREE_TOKENS  # fixed γ: a proposal of fewer expected drafts goes to the model
        rounds = model.costs(self._round[0])
        with model.state.lock:
            chances, slowdown = model.state.estimate.chances(model.max_gamma), model.state.costs.slowdown
        return max(prefix_speedups(chances, rounds, slowdown), default=1.0)

    def choose(self, proposal: Proposal, context: int) -> int:
        self.source = {FREE: self.free, MODEL: self.model}.get(proposal.source)  # the verdict goes to its policy
        if self.source is self.model:
            return self.model.choose(proposal, context)
        return len(proposal.tokens)  # the suffix prefix was chosen before comparing

    def update(self, drafted: int, accepted: int) -> None:
        if self.source is not None:
            self.source.update(drafted, accepted)

    def judge_held_back(self, right: bool) -> None:
        if self.source is not None:
            self.source.judge_held_back(right)

    def observe(self, drafted: int, measured_ms: float, context: int) -> None:
        if drafted and self.source is not None:
            self.source.observe(drafted, measured_ms, context)
        elif not drafted:  # a plain round: both policies compare their drafted rounds with it
            self.free.observe(0, measured_ms, context)
            self.model.observe(0, measured_ms, context)


class HybridProposer(Proposer):
    """Proposes with the suffix drafter when its match is worth at least the model's guess, else with
    the model (see the module's docstring)."""

    def __init__(self, free: SuffixProposer, model: DraftModelProposer, length: HybridLength) -> None:
        self.free = free
        self.model = model
        self.length = length

    @property
    def calls(self) -> int:
        return self.model.calls

    def reset(self) -> None:
        self.free.reset()
        self.model.reset()

    def accept(self, tokens: Sequence[int]) -> None:
        self.free.accept(tokens)
        self.model.accept(tokens)

    def rollback(self, tokens: Sequence[int]) -> None:
        self.free.rollback(tokens)
        self.model.rollback(tokens)  # a head keeps the features of every committed position

    def pending(self, tokens: Sequence[int]) -> int:
        return self.model.pending(tokens)

    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.free.learn(prompt, output)
        self.model.learn(prompt, output)

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        length = self.length
        free = self.free.propose(tokens, count, chooser)
        free = free.prefix(length.free.choose(free, len(tokens)))
        gain = length.free_gain(free)
        free.source = FREE
        if free.tokens and gain >= length.model_gain():
            return free
        gamma = min(length.model_gamma(), count)
        if gamma > 0:
            drafted = self.model.propose(tokens, gamma, chooser)
            drafted.source = MODEL
            return drafted
        if free.tokens:  # the model declined to draft: the suffix match is still worth sending
            return free
        return Proposal([])
