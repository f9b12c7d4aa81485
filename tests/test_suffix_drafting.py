"""Suffix drafting: exact output, a pool of earlier outputs across generations (bounded), drafts sized
by their evidence, and auto γ sending the prefix of scored drafts that pays on the round costs."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import chisquare

import ortspec
from ortspec.cli import main
from ortspec.export import export_pair
from ortspec.models.random import make_checkpoint
from ortspec.runtime.drafters.suffix import LOCAL, POOL, ConfidenceBuckets, SuffixMemory, SuffixProposer, bucket
from ortspec.runtime.drafters.token_index import ORDERS, TokenIndex
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation.auto_length import AutoDraftLength, AutoState
from ortspec.runtime.speculation.calibration import (
    MIN_GAIN,
    Calibration,
    best_gamma,
    best_prefix,
    expected_tokens,
    round_speedup,
)
from ortspec.runtime.speculation.proposal import Proposal
from ortspec.runtime.speculation.sampling import SamplingConfig, probabilities

from helpers.calibrations import synthetic

MAX_NEW = 40


def random_tokens(length: int, seed: int, vocab: int = 300) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(2, vocab, size=length)]


@pytest.fixture(scope="module")
def pipe(package):
    return ortspec.load(package("llama", None))  # target only, fp32


def fresh(pipe, calibration=None):
    """Forget what earlier tests taught the pipeline; optionally inject round costs for auto γ."""
    pipe.suffix_memory, pipe._auto, pipe._auto_states = SuffixMemory(), {}, {}
    pipe._calibration = calibration


# --- exactness on a real (tiny, random, fp32) model ---------------------------------------------


def test_greedy_suffix_equals_plain(pipe):
    fresh(pipe, synthetic(draft_ms=0.0, verify_growth=0.05))  # cheap verify positions: auto drafts readily
    accepted = 0
    for seed in range(3):
        phrase = random_tokens(7, seed)
        for prompt in (phrase * 3, random_tokens(12, seed + 10)):
            plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
            for gamma in (1, 4, "auto"):
                spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft="suffix", draft_tokens=gamma)
                assert spec.token_ids == plain.token_ids, (seed, gamma)
                assert spec.stats.drafter == "suffix" and spec.stats.draft_calls == 0
                if gamma != "auto":
                    assert max(spec.stats.drafted_per_round, default=0) <= gamma
                accepted += spec.stats.accepted_tokens
    assert accepted > 0


def test_pool_carries_outputs_across_generations_and_resets(pipe):
    fresh(pipe, synthetic(draft_ms=0.0, verify_growth=0.05))
    prompt = random_tokens(10, 42)  # no repeats inside: only the pool can help
    plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False).token_ids
    first = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft="suffix", draft_tokens=8)
    assert pipe.suffix_memory.pool.sequences == 1
    second = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft="suffix", draft_tokens=8)
    auto = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft="suffix")
    assert first.token_ids == second.token_ids == auto.token_ids == plain
    assert second.stats.acceptance_rate >= 0.9 and second.stats.tokens_per_target_call > 4
    assert second.stats.accepted_tokens > 2 * first.stats.accepted_tokens
    assert auto.stats.tokens_per_target_call > 3  # auto γ trusts the long pool match too

    other = ortspec.load(pipe.manifest.root)  # pipelines share no drafting state
    assert other.suffix_memory.pool.tokens == 0 and other.suffix_memory is not pipe.suffix_memory
    pipe.suffix_memory = SuffixMemory()  # a reset pool: the second generation's help is gone
    again = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft="suffix", draft_tokens=8)
    assert again.token_ids == plain
    assert again.stats.accepted_tokens == first.stats.accepted_tokens


def test_seeded_sampling_is_reproducible_with_a_warm_pool(pipe):
    fresh(pipe, synthetic(draft_ms=0.0, verify_growth=0.05))
    prompt = random_tokens(6, 3) * 3
    options = dict(max_new_tokens=24, draft="suffix", temperature=0.8, seed=5)
    first = pipe.generate(prompt, **options).token_ids
    pipe.generate(prompt, max_new_tokens=24, draft="suffix")  # warms the pool and the confidence table
    assert pipe.generate(prompt, **options).token_ids == first


def test_sampling_with_suffix_drafts_keeps_the_target_distribution(tmp_path):
    """Suffix drafts are deterministic (one-hot q): the Leviathan rule keeps sampling exact."""
    make_checkpoint(tmp_path / "ckpt", hidden=32, heads=2, kv_heads=1, std=0.25, tokenizer_vocab=24)
    export_pair(tmp_path / "ckpt", tmp_path / "pkg", quantize="none", report=lambda _: None)
    tiny = ortspec.load(tmp_path / "pkg", threads=1)
    tiny.eos_token_ids = frozenset()
    prompt = list(range(2, 24)) * 2  # whatever the first new token (but 0 and 1), the suffix drafts after it
    config = SamplingConfig(temperature=1.0)

    target = DecoderState(tiny.target)

    def next_probs(sequence):
        target.reset()
        return probabilities(target.forward(sequence)[-1], config, sequence)

    p1 = next_probs(prompt)
    exact = sum(p1[t] * next_probs([*prompt, t]) for t in range(len(p1)) if p1[t] > 0)
    counts = np.zeros(len(exact))
    drafted = 0
    for seed in range(5000):
        result = tiny.generate(prompt, max_new_tokens=3, draft="suffix", draft_tokens=2, temperature=1.0, seed=seed)
        counts[result.token_ids[1]] += 1
        drafted += result.stats.drafted_tokens
    expected = exact * counts.sum()
    keep = expected >= 5  # the rare tokens are merged into one cell
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert drafted > 4000 and chisquare(observed, expected).pvalue > 1e-3


def test_cli_suffix_drafter(package):
    root = str(package("llama", None))
    runner = CliRunner()
    args = ["generate", root, "a b c a b c a b", "--draft", "suffix", "--draft-tokens", "3", "--stats"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "(suffix, γ=3" in result.output


# --- the pool: bounded, oldest out ------------------------------------------------------------------


def test_pool_is_bounded_and_evicts_the_oldest_sequences():
    pool = TokenIndex(max_tokens=100)
    sequences = [random_tokens(30, seed, vocab=50) for seed in range(40)]
    for sequence in sequences:
        pool.add(sequence)
        assert pool.tokens <= 100 and pool.entries <= len(ORDERS) * pool.tokens
    assert pool.sequences == 3 and pool.tokens == 90
    rebuilt = TokenIndex()
    for sequence in sequences[-3:]:
        rebuilt.add(sequence)
    assert pool.entries == rebuilt.entries  # eviction left no stale index entries behind
    newest, oldest = sequences[-1], sequences[0]
    assert pool.find(newest[:12]).length >= 8  # the newest is there ...
    found = pool.find(oldest[:12])
    assert found.length < 8 or all(pool.at(s) != oldest[12] for s in found.starts)  # ... the oldest is gone
    pool.add(random_tokens(250, 99))  # longer than the pool: only its last 100 tokens are kept
    assert pool.sequences == 1 and pool.tokens == 100


def test_matches_never_cross_sequences_and_prefer_the_longest():
    index = TokenIndex()
    index.add([1, 2, 3, 4])
    index.add([5, 6, 2, 3, 9])
    assert index.find([2, 3]).length == 2
    assert [index.at(s) for s in index.find([2, 3]).starts] == [9, 4]  # latest first
    assert index.find([1, 2, 3]).length == 3 and index.at(index.find([1, 2, 3]).starts[0]) == 4
    assert index.find([3, 4]).length == 0  # [3, 4] ends the first sequence: nothing followed it
    assert index.find([4, 5]).length == 1  # a single-token match on 5, never "4 5" across the boundary


# --- variable length: drafts sized by evidence ------------------------------------------------------


def test_weak_evidence_drafts_short_or_nothing_strong_evidence_long():
    proposer = SuffixProposer(SuffixMemory())
    copied = random_tokens(40, 1)
    strong = proposer.propose([*copied, 500, *copied[:20]], 8, None)
    assert len(strong.tokens) >= 4 and strong.tokens == copied[20 : 20 + len(strong.tokens)]
    assert strong.confidence[0] > 0.75
    proposer.reset()
    weak_context = [*random_tokens(20, 2, vocab=100), 777, 5, *random_tokens(20, 3, vocab=100), 777]
    weak = proposer.propose(weak_context, 8, None)  # "777" seen once before: a one-token match
    assert len(weak.tokens) <= 2 and weak.tokens[:1] in ([], [5])
    assert all(c < strong.confidence[0] for c in weak.confidence)
    proposer.reset()
    disagreeing = [9, 8, 7, 1, 9, 8, 7, 2, 9, 8, 7, 3, 9, 8, 7, 4, 9, 8, 7]  # "9 8 7" went on four ways
    assert len(proposer.propose(disagreeing, 8, None).tokens) <= 1
    assert proposer.propose(disagreeing, 8, None).probs is None  # deterministic: one-hot q when sampling


def test_a_repeating_stretch_drafts_past_one_period():
    draft = SuffixProposer(SuffixMemory()).propose([9, 4, 1, 2, 3, 1, 2, 3, 1, 2, 3], 8, None).tokens
    assert len(draft) > 3 and draft == ([1, 2, 3] * 3)[: len(draft)]
    memory = SuffixMemory()
    memory.pool.add([7, 5, 6, 8])  # a pooled sequence's end is its end: nothing reads on past it
    assert SuffixProposer(memory)._candidate(memory.pool, [1, 5, 6], 8, POOL).tokens == [8]


def test_the_current_sequence_wins_ties_and_the_pool_wins_on_longer_matches():
    memory = SuffixMemory()
    memory.pool.add([1, 2, 3, 4, 20, 21, 22])
    proposer = SuffixProposer(memory)
    local = [7, 3, 4, 50, 51, 52, 8, 3, 4]  # "3 4" matched locally and in the pool (2 tokens each)
    assert proposer.propose(local, 3, None).tokens[:2] == [50, 51]
    proposer.reset()
    longer = [7, 3, 4, 50, 51, 52, 1, 2, 3, 4]  # the pool matches "1 2 3 4", the sequence only "3 4"
    assert proposer.propose(longer, 3, None).tokens[:2] == [20, 21]


def test_confidence_follows_what_the_target_accepted():
    memory = SuffixMemory()
    proposer = SuffixProposer(memory)
    context = [8, 7, 6, 5, 1, 2, 8, 7, 6, 5]  # the first draft follows a 4-token match, the second a 5-token one
    kind = bucket(LOCAL, 4, 1, 1)
    before = memory.confidence.chance(kind)
    for _ in range(30):
        proposal = proposer.propose(context, 4, None)
        proposer.accept([*context, 1, 99])  # the target keeps the first draft, then differs
        proposer.reset()
    assert memory.confidence.chance(kind) > before  # the first draft (match 5) always right
    assert memory.confidence.chance(bucket(LOCAL, 5, 1, 1)) < 0.2  # the second always wrong
    assert len(proposer.propose(context, 4, None).tokens) == 1 and proposal.tokens[0] == 1
    buckets = ConfidenceBuckets()
    assert buckets.chance(bucket(POOL, 17, 5, 5)) > buckets.chance(bucket(POOL, 1, 2, 5))  # the prior's order


def test_unsent_drafts_are_judged_too():
    """While nothing is sent (auto γ declines), the committed token still scores the first draft."""
    memory = SuffixMemory()
    proposer = SuffixProposer(memory)
    context = [4, 5, 6, 4, 5]
    kind = bucket(LOCAL, 2, 1, 1)  # "4 5" matched once, two tokens long
    proposer.propose(context, 3, None)
    proposer.accept([*context, 6])  # a plain round committed exactly the first draft
    assert memory.confidence.judged[kind] == 1 and memory.confidence.accepted[kind] == 1


# --- auto γ: the prefix of scored drafts with the best expected throughput ---------------------------


def test_best_prefix_maximises_expected_tokens_per_round_cost():
    steep = [10.0, 12.5, 16.0, 22.0, 28.0, 34.0, 40.0, 46.0, 52.0]  # int4-like: verify positions cost
    moderate = [10.0 + g for g in range(9)]
    flat = [10.0 + 0.2 * g for g in range(9)]  # fp32-like: extra positions nearly free
    assert expected_tokens([0.5, 0.5]) == pytest.approx(1.75)
    strong_then_weak = [0.95, 0.95, 0.95, 0.1, 0.9, 0.9, 0.9, 0.9]
    assert best_prefix(strong_then_weak, moderate) == 3  # a weak token stops the round before it
    assert best_prefix([0.2] * 8, steep) == 0  # weak evidence: decode plainly
    assert best_prefix([0.2] * 8, flat) > 0  # ... unless extra positions cost next to nothing
    assert best_prefix([0.9] * 8, flat) == 8 and best_prefix([0.9] * 8, steep) < 8
    assert best_prefix([0.99] * 3, flat) == 3  # never more than proposed
    for chances in ([0.6] * 8, [0.9, 0.5, 0.9, 0.9], [0.3, 0.99, 0.99, 0.99, 0.99]):
        gamma = best_prefix(chances, steep)
        speedups = [round_speedup(expected_tokens(chances[:g]), g, steep) for g in range(1, len(chances) + 1)]
        if gamma:
            assert speedups[gamma - 1] == max(speedups) >= MIN_GAIN
        else:
            assert max(speedups) < MIN_GAIN
    for alpha in (0.3, 0.6, 0.9):  # a constant chance is the i.i.d. model of best_gamma
        assert best_prefix([alpha] * 8, steep) == best_gamma(alpha, steep)


def test_auto_asks_scored_drafters_for_the_most_and_sends_the_best_prefix():
    cal = synthetic(draft_ms=0.0, verify_growth=0.3)  # 10 ms per step, +3 ms per extra position
    auto = AutoDraftLength(cal, AutoState(), draft_cost=False, max_gamma=6, scored=True)
    assert auto.next(100) == 6
    proposal = Proposal([5, 6, 7, 8, 9], confidence=[0.95, 0.9, 0.9, 0.05, 0.9])
    assert auto.choose(proposal, 100) == 3
    assert auto.choose(Proposal([5, 6], confidence=[0.1, 0.1]), 100) == 0
    assert auto.choose(Proposal([5, 6, 7]), 100) == 3  # unscored proposals were sized by `next`
    auto.state.costs.slowdown = 2.0  # drafted rounds observed 2x slower than calibrated, relative to plain ones
    assert auto.choose(proposal, 100) == 0


def test_round_costs_never_fall_with_more_drafts():
    """A calibration measured under load can dip (t(5) < t(4)); a dip must not lure auto γ into longer rounds."""
    dipped = Calibration("test", [100], [[10.0, 12.0, 16.0, 22.0, 19.0, 30.0, 31.0, 32.0, 33.0]], [0.0])
    assert dipped.rounds(100, draft_cost=False) == [10.0, 12.0, 16.0, 22.0, 22.0, 30.0, 31.0, 32.0, 33.0]
    assert best_prefix([0.9, 0.9, 0.9, 0.3, 0.3], dipped.rounds(100, draft_cost=False)) < 4
