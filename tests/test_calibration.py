"""Calibrated γ: the choice logic on synthetic timings, and auto γ leaving greedy output unchanged."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.runtime.speculation import calibration as calibration_module
from ortspec.runtime.speculation.auto_length import AcceptanceEstimate, AutoDraftLength, AutoState, RoundCosts
from ortspec.runtime.speculation.calibration import Calibration, tokens_per_round
from ortspec.runtime.speculation.calibration_store import CALIBRATION_FILE

from helpers.calibrations import synthetic


def test_tokens_per_round():
    assert tokens_per_round(0.0, 4) == 1.0
    assert tokens_per_round(1.0, 4) == 5.0
    assert tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert tokens_per_round(0.7, 0) == 1.0


def test_best_gamma_follows_acceptance_and_costs():
    cal = synthetic()
    gammas = [cal.best_gamma(alpha, 100) for alpha in (0.3, 0.5, 0.7, 0.9)]
    assert gammas == sorted(gammas) and gammas[-1] > gammas[0]  # better drafts: longer rounds
    assert cal.best_gamma(0.05, 100) == 0  # a useless draft: plain decoding
    assert cal.best_gamma(0.8, 100, draft_cost=False) >= cal.best_gamma(0.8, 100)  # free drafts (n-gram)
    expensive = synthetic(draft_ms=9.0)
    assert expensive.best_gamma(0.6, 100) == 0
    steep = synthetic(verify_growth=0.6)  # verifying many positions is costly (quantized CPU kernels)
    assert steep.best_gamma(0.8, 100) < cal.best_gamma(0.8, 100)


def test_best_gamma_requires_a_five_percent_gain():
    cal = synthetic(draft_ms=2.0, verify_growth=0.3)
    for alpha in [a / 100 for a in range(1, 100)]:
        gamma = cal.best_gamma(alpha, 100)
        if gamma:
            assert cal.predicted_speedup(alpha, gamma, 100) >= 1.05
        else:
            assert all(cal.predicted_speedup(alpha, g, 100) < 1.05 for g in range(1, 9))


def test_costs_interpolate_between_contexts():
    cal = synthetic()
    assert cal.target(1, 100) == 10.0 and cal.target(1, 1000) == 15.0
    assert cal.target(1, 550) == pytest.approx(12.5)
    assert cal.target(1, 10) == 10.0 and cal.target(1, 5000) == 15.0  # clamped


def test_acceptance_estimate_judges_each_position_given_the_ones_before():
    estimate = AcceptanceEstimate(prior=0.5, strength=0.0001, decay=1.0)
    for round_number in range(60):
        # the first draft is accepted 2 rounds in 3; after it, the second 1 in 2; nothing after a rejection counts
        accepted = [0, 1, 2, 1, 2, 0][round_number % 6]
        estimate.update(drafted=4, accepted=accepted)
    first, second, third, fourth = estimate.chances(4)
    assert first == pytest.approx(2 / 3, abs=1e-3) and estimate.alpha == first
    assert second == pytest.approx(1 / 2, abs=0.02)  # (a little pull towards the first)
    assert third == pytest.approx(0.0, abs=0.2)  # judged 20 times, never accepted
    assert fourth == pytest.approx(third, abs=0.05)  # never judged: leans on the position before it
    assert estimate.chances(6)[5] == pytest.approx(third, abs=0.05)


def test_auto_sends_one_draft_when_the_second_is_rarely_right():
    """A feature head's own second guess is far worse than its first. One rate for both (here 8/18: the
    geometric estimate) would pick γ = 2; the per-position estimate sends one draft."""
    cal = synthetic(draft_ms=0.5, verify_growth=0.05)
    state = AutoState(AcceptanceEstimate(prior=0.5, strength=0.0001, decay=1.0))
    auto = AutoDraftLength(cal, state)
    for round_number in range(100):  # the first draft right 4 in 5, the second never
        auto.update(drafted=2, accepted=[0, 1, 1, 1, 1][round_number % 5])
    assert state.estimate.chances(2) == pytest.approx([0.8, 0.0], abs=0.05)
    assert auto.next(100) == 1
    assert cal.best_gamma(8 / 18, 100) == 2


def test_measured_rounds_override_the_sum_of_parts():
    cheap = synthetic(draft_ms=0.5, verify_growth=0.05)
    assert cheap.best_gamma(0.7, 100) > 0
    assert cheap.round(3, 100) == pytest.approx(3 * 0.5 + cheap.target(4, 100))
    contended = synthetic(draft_ms=0.5, verify_growth=0.05, round_overhead=20.0)  # e.g. thread pools fighting
    assert contended.round(3, 100) == pytest.approx(cheap.round(3, 100) + 20.0)
    assert contended.best_gamma(0.7, 100) == 0
    assert contended.best_gamma(0.7, 100, draft_cost=False) == cheap.best_gamma(0.7, 100, draft_cost=False)


def test_alpha_needed_is_the_boundary_of_paying():
    cal = synthetic(draft_ms=2.0, verify_growth=0.2)
    needed = cal.alpha_needed(100)
    assert needed is not None and 0 < needed < 0.99
    assert cal.best_gamma(needed, 100) > 0 and cal.best_gamma(needed - 0.02, 100) == 0
    assert synthetic(draft_ms=9.5, verify_growth=1.0).alpha_needed(100) is None  # hopeless at any α


def test_auto_probes_with_a_bounded_share_of_the_time():
    cal = synthetic(draft_ms=3.0, verify_growth=0.3, catch_up_ms=8.0)
    auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.1)))
    probes = [i for i in range(3000) if auto.next(100, pending=64) == 1]
    probe_ms = cal.draft(100) + cal.catch_up(63, 100)  # what one held-back probe costs over plain
    assert probes and len(probes) * probe_ms <= AutoDraftLength.PROBE_SHARE * 3000 * cal.round(0, 100) * 1.01
    gaps = {b - a for a, b in itertools.pairwise([-1, *probes])}
    assert gaps == {math.ceil(probe_ms / (AutoDraftLength.PROBE_SHARE * cal.round(0, 100)))}


def test_auto_never_probes_where_drafting_cannot_pay():
    auto = AutoDraftLength(synthetic(draft_ms=9.5, verify_growth=1.0), AutoState())
    assert all(auto.next(100) == 0 for _ in range(2000))


def test_auto_drafts_once_the_estimate_says_it_pays():
    state = AutoState(AcceptanceEstimate(prior=0.1))
    auto = AutoDraftLength(synthetic(), state)
    assert auto.next(100) == 0
    for _ in range(40):
        auto.update(drafted=4, accepted=4)
    assert state.estimate.alpha > 0.9 and auto.next(100) >= 3


def test_auto_drafts_only_if_the_saving_pays_for_the_catch_up():
    cal = synthetic(catch_up_ms=40.0)  # the draft reading 64 unseen tokens costs 4 plain steps
    auto = AutoDraftLength(cal, AutoState(AcceptanceEstimate(prior=0.95, strength=100)))
    assert auto.next(100, remaining=500, pending=2) > 0  # the usual 1-2 tokens: nothing to weigh
    assert auto.next(100, remaining=500, pending=64) > 0  # long way to go: worth it
    assert auto.next(100, remaining=3, pending=64) == 0  # three tokens left cannot repay the catch-up


def test_round_costs_scale_the_prediction_of_drafted_rounds():
    costs = RoundCosts()
    for _ in range(100):
        costs.observe(drafted=False, measured_ms=10.0, calibrated_ms=10.0)
    for _ in range(100):
        costs.observe(drafted=True, measured_ms=15.0, calibrated_ms=10.0)
    assert costs.slowdown == pytest.approx(1.5, rel=0.01)
    costs.observe(drafted=False, measured_ms=1000.0, calibrated_ms=10.0)  # one preempted round
    assert costs.plain <= 1.0 + RoundCosts.WEIGHT * (RoundCosts.CLIP[1] - 1.0) + 1e-9
    cal = synthetic(draft_ms=0.5, verify_growth=0.05)
    state = AutoState(AcceptanceEstimate(prior=0.7, strength=100))
    assert AutoDraftLength(cal, state).next(100) > 0
    state.costs = RoundCosts()
    state.costs.slowdown = 3.0  # drafted rounds observed 3x slower than calibrated, relative to plain ones
    assert AutoDraftLength(cal, state).next(100) == 0


def test_a_stale_slowdown_fades_while_decoding_plainly():
    """A burst of load while drafting reads as dear drafting; plain rounds cannot measure drafting, so
    the reading fades instead of keeping the loop from drafting for good."""
    costs = RoundCosts()
    for _ in range(30):
        costs.observe(drafted=True, measured_ms=20.0, calibrated_ms=10.0)  # the machine got busy
    assert costs.slowdown > 1.8
    for _ in range(60):
        costs.observe(drafted=False, measured_ms=10.0, calibrated_ms=10.0)
    assert costs.slowdown < 1.05


def test_a_row_of_a_batched_step_costs_what_one_more_position_adds():
    cal = synthetic(verify_growth=0.2)  # 10 ms for one position at context 100, each more adds 2 ms
    assert cal.batched_step(1, 100) == 10.0  # alone: the whole step
    assert [cal.batched_step(rows, 100) for rows in (2, 4, 9)] == pytest.approx([2.0, 2.0, 2.0])
    assert cal.batched_step(40, 100) == pytest.approx(2.0)  # wider than calibrated: the same slope
    flat = synthetic(verify_growth=0.0)  # one more position costs nothing (or less: noise)
    assert flat.batched_step(4, 100) == pytest.approx(calibration_module.MIN_ROW_SHARE * 10.0)


def test_auto_drafting_fades_as_the_batch_fills_and_returns_as_it_empties():
    """Each round weighs drafting against what a plain round adds to the batch's step at the present
    load: a drafting row's verify call runs alone and holds up the others."""
    cal = synthetic(draft_ms=0.5, verify_growth=0.15)
    rows = [1]
    state = AutoState(AcceptanceEstimate(prior=0.8, strength=100))
    auto = AutoDraftLength(cal, state, load=lambda: rows[0])
    chosen = []
    for load in (1, 2, 4, 2, 1):
        rows[0] = load
        chosen.append(auto.next(100, pending=1))
    assert chosen[0] > 0 and chosen[-1] == chosen[0]  # alone: as without batching
    assert chosen[0] == AutoDraftLength(cal, state).next(100, pending=1)
    assert chosen[1:4] == [0, 0, 0]  # a row of 2 or 4 adds 1.5 ms to a step: a 10+ ms verify alone cannot pay
    alone = AutoDraftLength(cal, state).costs(100)
    assert auto.costs(100)[1:] == alone[1:]  # a drafted round costs what it costs alone
    rows[0] = 2
    assert auto.costs(100)[0] == pytest.approx(alone[0] * 0.15)  # one more position's share of a step
    auto.observe(0, 50.0, 100)  # a round beside other rows times the batch, not this machine's calls
    auto.observe(2, 80.0, 100)
    assert (state.costs.plain, state.costs.slowdown) == (1.0, 1.0)
    rows[0] = 1
    auto.observe(0, 50.0, 100)
    assert state.costs.plain > 1.0


def test_auto_keeps_greedy_output_and_stores_calibration(package, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "pkg"
    shutil.copytree(package("llama", draft="same"), root)
    pipe = ortspec.load(root)
    prompts = [[5, 6, 7], [9, 40, 3, 3, 8], [100]]
    for prompt in prompts:
        auto = pipe.generate(prompt, max_new_tokens=30, draft_tokens="auto")
        assert auto.token_ids == pipe.generate(prompt, max_new_tokens=30, use_draft=False).token_ids
        assert auto.stats.draft_tokens == "auto"
    stored = json.loads((root / CALIBRATION_FILE).read_text())["calibrations"]
    assert len(stored) == 1 and stored[0]["key"] == pipe.calibration().key
    ortspec.load(root)  # an extra file beside the manifest does not break verification

    def fail(*args, **kwargs):
        raise AssertionError("remeasured although a calibration was stored")

    monkeypatch.setattr("ortspec.runtime.pipeline.measure", fail)
    again = ortspec.load(root)
    assert (
        again.generate([5, 6, 7], max_new_tokens=10, draft_tokens="auto").token_ids
        == pipe.generate([5, 6, 7], max_new_tokens=10, use_draft=False).token_ids
    )


def test_read_only_package_still_calibrates(package, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "cache"))  # where a non-root user's run stores it
    root = tmp_path / "ro"
    shutil.copytree(package("llama", draft="close"), root)
    os.chmod(root, 0o555)
    try:
        pipe = ortspec.load(root)
        result = pipe.generate([5, 6, 7], max_new_tokens=12, draft_tokens="auto")
        assert result.token_ids == pipe.generate([5, 6, 7], max_new_tokens=12, use_draft=False).token_ids
    finally:
        os.chmod(root, 0o755)


def test_calibrate_command(package, tmp_path):
    import shutil

    root = tmp_path / "pkg"
    shutil.copytree(package("llama", draft="close"), root)
    result = CliRunner().invoke(main, ["calibrate", str(root), "--max-gamma", "4"])
    assert result.exit_code == 0, result.output
    assert "t(n)" in result.output and "r(γ)" in result.output and "drafting" in result.output
    (entry,) = json.loads((root / CALIBRATION_FILE).read_text())["calibrations"]
    stored = calibration_module.Calibration(**entry)
    assert stored.max_gamma == 4 and len(stored.round_ms) == len(stored.contexts)
    assert all(len(row) == 4 and min(row) > 0 for row in stored.round_ms)


def test_auto_output_equals_plain_when_it_drafts_and_when_it_does_not(package):
    """Whatever auto γ chooses (forced here by injected calibrations), greedy output stays the target's."""
    pipe = ortspec.load(package("llama", draft="close"))
    prompt = [5, 6, 7, 9, 40, 3]
    plain = pipe.generate(prompt, max_new_tokens=30, use_draft=False).token_ids
    cheap_drafts = synthetic(draft_ms=0.1, verify_growth=0.01)
    hopeless_drafts = synthetic(draft_ms=9.5, verify_growth=1.0)
    for calibration, drafts in ((cheap_drafts, True), (hopeless_drafts, False)):
        pipe._calibration, pipe._auto, pipe._auto_states = calibration, {}, {}
        result = pipe.generate(prompt, max_new_tokens=30, draft_tokens="auto")
        assert result.token_ids == plain
        assert (result.stats.drafted_tokens > 0) == drafts
        assert result.stats.undrafted_rounds == (0 if drafts else result.stats.target_calls - 2)


def test_a_probe_is_timed_as_a_probe_not_as_a_drafted_round():
    cal = synthetic(draft_ms=3.0, verify_growth=0.3, catch_up_ms=8.0)
    state = AutoState(AcceptanceEstimate(prior=0.1))
    auto = AutoDraftLength(cal, state)
    while auto.next(100, pending=64) != 1:
        auto.observe(0, cal.round(0, 100), 100)
    predicted = cal.draft(100) + cal.catch_up(63, 100)
    auto.observe(1, cal.round(0, 100) + 25.0, 100)  # the probe took 25 ms more than a plain round
    assert state.probe_ratio == pytest.approx(25.0 / predicted, rel=0.01) and state.costs.slowdown == 1.0
    while auto.next(100, pending=64) != 1:  # a probe that ends a generation is never timed ...
        pass
    assert auto.next(100, pending=64) == 0  # ... and the next generation's plain round is not taken for it
    auto.observe(0, cal.round(0, 100) + 40.0, 100)
    assert state.probe_ratio == pytest.approx(25.0 / predicted, rel=0.01) and state.costs.plain > 1.0


def test_a_verdict_on_a_position_no_longer_drafted_fades():
    """One rejection of the second draft, then rounds that draft only one: the second position is never
    judged again, so its estimate must drift back to leaning on the first's rather than keep the verdict."""
    estimate = AcceptanceEstimate()
    estimate.update(drafted=4, accepted=1)  # the second draft rejected
    first, second = estimate.chances(2)
    assert second < 0.75 * first
    for _ in range(100):
        estimate.update(drafted=1, accepted=1)
    first, second = estimate.chances(2)
    assert second == pytest.approx(first, abs=0.03)


def test_auto_tries_longer_rounds_again_after_an_unlucky_one():
    """A free drafter right 3 times in 4, on costs where γ = 1 is best at the prior's 0.6 and γ = 4 at 0.75
    (int4 t(n) of a 1.1B model at 1 thread). An early rejection of the second draft makes γ = 1 look best;
    rounds of γ = 1 never judge the second draft again, so without forgetting auto would stay at γ = 1 for good."""
    rows = [[10.0 * v for v in (1.0, 1.12, 1.46, 1.65, 1.72, 1.87, 2.1, 2.24, 2.46)]] * 2
    cal = Calibration("test", [100, 1000], rows, [0.0, 0.0])
    assert cal.best_gamma(0.6, 100, draft_cost=False) == 1 and cal.best_gamma(0.75, 100, draft_cost=False) == 4
    auto = AutoDraftLength(cal, AutoState(), draft_cost=False, learn_timings=False)
    right = itertools.chain([True, True, False], itertools.cycle([True, True, True, False]))  # position by position
    chosen = []
    for _ in range(60):
        gamma, accepted = auto.next(100), 0
        while accepted < gamma and next(right):
            accepted += 1
        auto.update(gamma, accepted)
        chosen.append((gamma, accepted))
    assert chosen[:3] == [(1, 1), (4, 1), (1, 1)]  # the unlucky round, then γ = 1
    assert any(gamma > 1 for gamma, _ in chosen[3:40])
