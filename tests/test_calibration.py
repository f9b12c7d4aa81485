"""Calibrated γ: the choice logic on synthetic timings, and auto γ leaving greedy output unchanged."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.runtime import calibration as calibration_module
from ortspec.runtime.calibration import CALIBRATION_FILE, Calibration, tokens_per_round
from ortspec.runtime.speculative import AcceptanceEstimate, AutoDraftLength


def synthetic(draft_ms: float = 1.0, verify_growth: float = 0.1) -> Calibration:
    """Target 10 ms per step at context 100 (15 ms at 1000); each extra position adds `verify_growth`."""
    rows = [[base * (1 + verify_growth * (n - 1)) for n in range(1, 10)] for base in (10.0, 15.0)]
    return Calibration("test", [100, 1000], rows, [draft_ms, draft_ms * 1.2])


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


def test_acceptance_estimate_counts_rejections_not_unjudged_drafts():
    estimate = AcceptanceEstimate(prior=0.5, strength=0.0001, decay=1.0)
    for _ in range(50):
        estimate.update(drafted=4, accepted=2)  # 2 accepted, then a rejection: α ≈ 2/3, not 2/4
    assert estimate.alpha == pytest.approx(2 / 3, abs=1e-3)


def test_auto_probes_after_plain_rounds():
    auto = AutoDraftLength(synthetic(draft_ms=50.0), AcceptanceEstimate())
    choices = [auto.next(100) for _ in range(AutoDraftLength.PROBE_EVERY)]
    assert choices[:-1] == [0] * (AutoDraftLength.PROBE_EVERY - 1) and choices[-1] == 1


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


def test_read_only_package_still_calibrates(package, tmp_path):
    import shutil

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
    assert "t(5)" in result.output and "best γ" in result.output and (root / CALIBRATION_FILE).is_file()
    (entry,) = json.loads((root / CALIBRATION_FILE).read_text())["calibrations"]
    assert calibration_module.Calibration(**entry).max_gamma == 4
