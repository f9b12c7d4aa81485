"""The hybrid drafter (suffix matches where they are worth more, the draft model elsewhere) is exact,
picks its source by predicted gain, and auto γ's held-back probes and round costs learn what they should."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import ortspec
from ortspec.runtime.drafters.hybrid import HybridLength, HybridProposer
from ortspec.runtime.speculation.auto_length import AcceptanceEstimate, AutoDraftLength, AutoState, RoundCosts
from ortspec.runtime.speculation.draft_length import DraftLength
from ortspec.runtime.speculation.proposal import Proposal

from helpers.calibrations import synthetic

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 40, 41, 5, 6, 7, 8]  # repeats: suffix matches exist


@pytest.mark.parametrize("kind", ["head", "draft LM"])
@pytest.mark.parametrize("draft_tokens", [1, 3, "adaptive", "auto"])
def test_hybrid_speculation_equals_plain(
    kind: str, draft_tokens: int | str, llama_head_package: Path, package: Callable[..., Path]
) -> None:
    pipe = ortspec.load(llama_head_package if kind == "head" else package("llama", draft="close"))
    for _ in range(2):  # the second generation also drafts from the first one's output (the pool)
        plain = pipe.generate(PROMPT, max_new_tokens=40, use_draft=False)
        spec = pipe.generate(PROMPT, max_new_tokens=40, draft_tokens=draft_tokens)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.drafter == "hybrid"  # the default drafter of a package with a draft model
    if draft_tokens != "auto":
        assert spec.stats.drafted_tokens > 0


class StubProposer:
    """Proposes fixed tokens (with fixed chances, like the suffix drafter) and counts its calls."""

    def __init__(self, tokens: list[int], chances: list[float] | None = None) -> None:
        self.tokens, self.chances, self.calls = tokens, chances, 0

    def propose(self, tokens: Sequence[int], count: int, chooser: object) -> Proposal:
        self.calls += 1
        return Proposal(self.tokens[:count], confidence=None if self.chances is None else self.chances[:count])

    def rollback(self, tokens: Sequence[int]) -> None: ...
    def pending(self, tokens: Sequence[int]) -> int:
        return 0

    def reset(self) -> None: ...
    def learn(self, prompt: Sequence[int], output: Sequence[int]) -> None: ...


def hybrid(chances: list[float], length: HybridLength) -> tuple[Proposal, StubProposer, StubProposer]:
    free, model = StubProposer([1, 2, 3], chances), StubProposer([7, 8, 9])
    proposer = HybridProposer(free, model, length)  # type: ignore[arg-type]
    count = length.next(100, 500, 0)
    proposal = proposer.propose([0] * 100, count, None)  # type: ignore[arg-type]
    return proposal.prefix(length.choose(proposal, 100)), free, model


def test_fixed_gamma_sends_a_suffix_match_expected_to_keep_a_draft() -> None:
    sent, _, model = hybrid([0.9, 0.9, 0.9], HybridLength(DraftLength(3), DraftLength(3)))
    assert sent.tokens == [1, 2, 3] and model.calls == 0
    sent, _, model = hybrid([0.3, 0.3, 0.3], HybridLength(DraftLength(3), DraftLength(3)))
    assert sent.tokens == [7, 8, 9] and model.calls == 1


def auto_pair(model_alpha: float) -> HybridLength:
    cal = synthetic(draft_ms=0.5, verify_growth=0.05)
    free = AutoDraftLength(cal, AutoState(), draft_cost=False, scored=True)
    model = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=model_alpha, strength=100)))
    return HybridLength(free, model)


def test_auto_takes_the_source_predicted_to_gain_more() -> None:
    sure, weak = [0.95, 0.95, 0.95], [0.6, 0.6, 0.6]
    sent, _, model = hybrid(sure, auto_pair(model_alpha=0.7))
    assert sent.tokens == [1, 2, 3] and model.calls == 0  # a long sure match beats a good model
    sent, _, model = hybrid(weak, auto_pair(model_alpha=0.9))
    assert sent.tokens[0] == 7 and model.calls == 1  # a better model beats a weak match
    sent, _, model = hybrid(weak, auto_pair(model_alpha=0.1))
    assert sent.tokens[0] == 1 and model.calls == 0  # a hopeless model leaves the match to be sent


def test_held_back_probes_turn_drafting_back_on() -> None:
    """While α is estimated too low to draft, probes guess a token that is not sent; guesses the target
    confirms raise α until drafting resumes."""
    cal = synthetic(draft_ms=0.5, verify_growth=0.05)
    auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.05, strength=20)))
    probes = 0
    for _ in range(5000):
        gamma = auto.next(100, pending=1)
        if gamma and auto.choose(Proposal([7] * gamma), 100) > 0:
            break  # drafting for real
        if gamma:  # a probe: held back, then judged right
            probes += 1
            auto.judge_held_back(True)
        auto.observe(0, cal.round(0, 100), 100)
    else:
        pytest.fail("drafting never resumed")
    assert probes > 0 and auto.state.estimate.alpha > 0.1  # from 0.05
    assert auto.state.costs.slowdown == 1.0  # probes are timed as probes, not as drafted rounds


def test_a_machine_faster_than_its_calibration_does_not_look_like_slow_drafting() -> None:
    costs = RoundCosts()
    for _ in range(100):  # a quiet stretch of plain rounds, 20% faster than calibrated
        costs.observe(drafted=False, measured_ms=8.0, calibrated_ms=10.0)
    assert costs.slowdown == 1.0
    for _ in range(100):  # drafted rounds 20% faster than calibrated too: just as fast, relatively
        costs.observe(drafted=True, measured_ms=8.0, calibrated_ms=10.0)
    assert costs.slowdown == pytest.approx(1.0, abs=0.01)


def test_a_round_with_a_long_catch_up_is_not_taken_for_slow_drafting() -> None:
    cal = synthetic(draft_ms=0.5, verify_growth=0.05, catch_up_ms=8.0)
    auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.9, strength=100)))
    gamma = auto.next(100, remaining=500, pending=64)  # the first round reads the whole prompt
    assert gamma > 0
    auto.observe(gamma, 3 * cal.round(gamma, 100), 100)
    assert auto.state.costs.slowdown == 1.0
    gamma = auto.next(100, remaining=500, pending=2)  # a steady round: its time counts
    auto.observe(gamma, 1.5 * cal.round(gamma, 100), 100)
    assert auto.state.costs.slowdown > 1.0


def test_hybrid_sampling_is_reproducible_and_drafts_from_both(llama_head_package: Path) -> None:
    """Seeded sampling: the same text twice (suffix drafts from this sequence alone), the target's
    distribution (tested for each drafter in test_distribution) with drafts from the head and the suffix."""
    pipe = ortspec.load(llama_head_package)
    runs = [pipe.generate(PROMPT, max_new_tokens=40, temperature=0.8, seed=11, draft_tokens=2) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.drafter == "hybrid" and runs[0].stats.drafted_tokens > 0


def test_cheap_drafts_probe_often_dear_ones_rarely() -> None:
    """A probe costs a draft step plus the catch-up since the last one: with the pending tokens growing
    between probes, a cheap draft probes every few tokens and a dear one far apart."""

    def gaps(draft_ms: float, catch_up_ms: float) -> int:
        cal = synthetic(draft_ms=draft_ms, verify_growth=0.05, catch_up_ms=catch_up_ms)
        auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.05, strength=1000)))
        pending, probes = 1, []
        for i in range(2000):
            if auto.next(100, pending=pending) == 1:
                probes.append(i)
                pending = 1
            else:
                pending = min(pending + 1, 64)
        return (probes[-1] - probes[0]) // (len(probes) - 1)

    cheap, dear = gaps(draft_ms=0.05, catch_up_ms=1.0), gaps(draft_ms=1.0, catch_up_ms=8.0)
    assert cheap <= 10 < dear


def test_a_free_drafter_probes_every_plain_round_at_no_cost() -> None:
    """Prompt lookup's guesses cost nothing: while its α is too low to send drafts, every plain round
    holds one back and judges it."""
    cal = synthetic(draft_ms=0.5, verify_growth=0.05)
    auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.02, strength=1000)), draft_cost=False)
    for _ in range(5):
        assert auto.next(100) == 1 and auto.choose(Proposal([7]), 100) == 0
        auto.judge_held_back(False)
        auto.observe(0, cal.round(0, 100) * 1.1, 100)
    assert auto.state.probe_ratio is None and auto.state.costs.plain > 1.0  # timed as plain rounds
