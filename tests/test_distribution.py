"""Speculative sampling draws from exactly the target's distribution (chi-square against the exact one).

A tiny target with 24 tokens and a deliberately different draft (its weights heavily perturbed).
The exact distribution of the 2nd and 3rd new tokens is computed from the target's own logits
(summing over the 1st); those are the tokens speculative rounds decide (the 1st comes from the
prefill). 20,000 generations per setting, fixed seeds, so the p-values below are reproducible.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

import ortspec
from ortspec.export import export_pair
from ortspec.models.random import make_checkpoint, perturbed_copy
from ortspec.runtime.drafters import hybrid
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation import loop as speculative
from ortspec.runtime.speculation.sampling import SamplingConfig, probabilities

PROMPT = [3, 7, 11]
SAMPLES = 20_000
SETTINGS = {
    "t1.0": dict(temperature=1.0),
    "t0.7-topk10-topp0.9": dict(temperature=0.7, top_k=10, top_p=0.9),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    shape = dict(hidden=32, layers=2, heads=2, kv_heads=1, std=0.25, tokenizer_vocab=24)
    target = make_checkpoint(root / "target", "llama", seed=0, **shape)
    draft = perturbed_copy(target, root / "draft", noise=0.6)
    export_pair(target, root / "pkg", draft=draft, quantize="none", report=lambda _: None)
    pipe = ortspec.load(root / "pkg", threads=1)  # tiny graphs: one thread avoids sync overhead
    pipe.eos_token_ids = frozenset()  # the exact distribution below has no stopping in it
    return pipe


def exact_joint(pipe, options) -> np.ndarray:
    """P(t2, t3) = sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2), from the target's own logits."""
    config = SamplingConfig(**{k: v for k, v in options.items() if k != "draft"})
    target = DecoderState(pipe.target)

    def next_probs(sequence):
        target.reset()
        return probabilities(target.forward(sequence)[-1], config, sequence)

    vocab = target.vocab_size
    joint = np.zeros((vocab, vocab))
    p1 = next_probs(PROMPT)
    for t1 in np.flatnonzero(p1):
        p2 = next_probs([*PROMPT, t1])
        for t2 in np.flatnonzero(p2):
            joint[t2] += p1[t1] * p2[t2] * next_probs([*PROMPT, t1, t2])
    return joint


def sampled_joint(pipe, options, speculative_on: bool, samples: int) -> tuple[np.ndarray, float]:
    vocab = pipe.target.vocab_size
    counts = np.zeros((vocab, vocab))
    accepted = drafted = 0
    for seed in range(samples):
        result = pipe.generate(PROMPT, max_new_tokens=4, draft_tokens=2, use_draft=speculative_on, seed=seed, **options)
        counts[result.token_ids[1], result.token_ids[2]] += 1
        accepted += result.stats.accepted_tokens
        drafted += result.stats.drafted_tokens
    return counts, accepted / drafted if drafted else 0.0


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson chi-square p-value, cells expecting fewer than 5 merged into one."""
    observed, expected = observed.ravel(), expected_probs.ravel() * observed.sum()
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert observed.sum() == pytest.approx(expected.sum())
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(
    "speculative_on, drafter",
    [(True, "hybrid"), (True, "model"), (False, None)],
    ids=["speculative-hybrid", "speculative-model", "plain"],
)
def test_sampling_matches_the_target_distribution(pair, setting, speculative_on, drafter, monkeypatch):
    """hybrid (the default here) drafts from suffix matches and the draft model, here sending every suffix
    match it finds (so that both kinds of rounds are sampled); model drafts from the model alone."""
    monkeypatch.setattr(hybrid, "FIXED_FREE_TOKENS", 0.0)
    options = SETTINGS[setting]
    joint = exact_joint(pair, options)
    assert joint.sum() == pytest.approx(1.0)
    counts, acceptance = sampled_joint(pair, {**options, "draft": drafter}, speculative_on, SAMPLES)
    p_marginal = chi_square_p(counts.sum(axis=1), joint.sum(axis=1))
    p_joint = chi_square_p(counts, joint)
    print(
        f"\n{setting} {'speculative' if speculative_on else 'plain'}: p(t2) = {p_marginal:.4f}, "
        f"p(t2, t3) = {p_joint:.4f}, acceptance {acceptance:.3f}"
    )
    assert p_marginal > 1e-3 and p_joint > 1e-3
    if speculative_on:
        assert 0.01 < acceptance < 0.95  # the draft really differs, yet is sometimes right


def test_a_broken_acceptance_rule_is_caught(pair, monkeypatch):
    """Accepting every draft (ignoring p/q) yields the draft's distribution: the test must see it."""
    monkeypatch.setattr(speculative, "accept_probability", lambda p, q: 1.0)
    options = {**SETTINGS["t1.0"], "draft": "model"}
    counts, _ = sampled_joint(pair, options, True, 5_000)
    p_marginal = chi_square_p(counts.sum(axis=1), exact_joint(pair, options).sum(axis=1))
    print(f"\nbroken rule: p(t2) = {p_marginal:.2e}")
    assert p_marginal < 1e-6


def test_same_seed_same_sample(pair):
    options = dict(max_new_tokens=12, temperature=0.9, top_p=0.95)
    first = pair.generate(PROMPT, seed=123, **options).token_ids
    assert pair.generate(PROMPT, seed=123, **options).token_ids == first
    others = {tuple(pair.generate(PROMPT, seed=s, **options).token_ids) for s in range(5)}
    assert len(others) > 1


def test_temperature_zero_is_greedy_everywhere(pair):
    greedy = pair.generate(PROMPT, max_new_tokens=10, use_draft=False).token_ids
    for gamma in (1, 3):
        assert pair.generate(PROMPT, max_new_tokens=10, temperature=0.0, draft_tokens=gamma, seed=1).token_ids == greedy


def test_every_joint_cell_is_reachable_in_exact_computation(pair):
    """Guard for exact_joint: with plain temperature 1 every (t2, t3) pair has positive probability."""
    joint = exact_joint(pair, SETTINGS["t1.0"])
    assert all(joint[a, b] > 0 for a, b in itertools.product(range(2, 6), repeat=2))
