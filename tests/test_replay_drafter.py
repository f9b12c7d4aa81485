"""The benchmarks' replay drafter, plugged in through `Pipeline.generate(proposer=...)`: at α = 1 it is the
target itself, at α = 0 it never guesses right, and the output is plain greedy's either way."""

from __future__ import annotations

from pathlib import Path

import pytest

import ortspec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_NEW = 24


@pytest.fixture
def replay(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import replay

    return replay


@pytest.fixture(scope="module")
def pipe(package):
    return ortspec.load(package("llama", draft=None))


@pytest.mark.parametrize("gamma", [1, 3])
def test_every_guess_accepted_at_alpha_one(gamma, pipe, replay):
    prompt = [5, 9, 2, 7, 11, 3]
    proposer = replay.replay_proposer(pipe, prompt, MAX_NEW, alpha=1.0)
    spec = pipe.generate(prompt, proposer=proposer, max_new_tokens=MAX_NEW, draft_tokens=gamma)
    assert spec.token_ids == proposer.truth == pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False).token_ids
    assert spec.stats.drafter == "custom"
    assert spec.stats.acceptance_rate == 1.0
    assert spec.stats.target_calls == 1 + -(-(MAX_NEW - 1) // (gamma + 1))  # prefill + ceil(rest / (γ+1))


def test_no_guess_accepted_at_alpha_zero(pipe, replay):
    prompt = [5, 9, 2, 7, 11, 3]
    proposer = replay.replay_proposer(pipe, prompt, MAX_NEW, alpha=0.0)
    spec = pipe.generate(prompt, proposer=proposer, max_new_tokens=MAX_NEW, draft_tokens=3)
    assert spec.token_ids == proposer.truth
    assert spec.stats.drafted_tokens > 0
    assert spec.stats.accepted_tokens == 0


def test_corruption_follows_alpha_and_seed(replay):
    truth = list(range(2000))
    half = replay.ReplayProposer([1], truth, 0.5, vocab_size=3000, seed=4)
    assert 0.45 < sum(g == t for g, t in zip(half.guesses, truth, strict=True)) / len(truth) < 0.55
    assert half.guesses == replay.ReplayProposer([1], truth, 0.5, vocab_size=3000, seed=4).guesses
    assert half.guesses != replay.ReplayProposer([1], truth, 0.5, vocab_size=3000, seed=5).guesses


def test_leaving_the_continuation_stops_proposals(replay):
    proposer = replay.ReplayProposer([1, 2], [3, 4, 5], 1.0, vocab_size=10)
    assert proposer.propose([1, 2, 3], 2, None).tokens == [4, 5]
    assert proposer.propose([1, 2, 9], 2, None).tokens == []


def test_a_proposer_needs_speculative_decoding(pipe, replay):
    proposer = replay.ReplayProposer([1], [2], 1.0, vocab_size=pipe.target.vocab_size)
    with pytest.raises(ValueError, match="use_draft=False"):
        pipe.generate([1], proposer=proposer, max_new_tokens=1, use_draft=False)
