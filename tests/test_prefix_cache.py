"""The prefix cache: a generation whose prompt starts with a sequence an idle state (or free batch row) still
holds feeds only the rest of its prompt, and its output is the one it gets without the cache, whatever
drafts; idle states are evicted least recently used first within their bounds, and generations running
at once never share a state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import ortspec
from ortspec.runtime.model.decoder import MIN_REUSE, DecoderState, shared_prefix
from ortspec.runtime.model.state_pool import StatePool

PREFIX = [int(t) for t in np.random.default_rng(1).integers(2, 300, size=40)]
ENDINGS = [[int(t) for t in np.random.default_rng(seed).integers(2, 300, size=3 + seed)] for seed in (2, 3, 4)]
GREEDY = dict(max_new_tokens=12)
DRAFTERS = [
    dict(use_draft=False),
    dict(draft="suffix", draft_tokens=3),
    dict(draft="ngram", draft_tokens=3),
    dict(draft="model", draft_tokens=3),
]


@pytest.fixture(scope="module")
def built(package: Callable[..., Path]) -> Path:
    """The tiny fp32 llama pair (a close draft LM), builder graphs (shared buffers, batching)."""
    return package("llama", draft="close", exporter="builder")


Call = tuple[str, int, np.ndarray]


@pytest.fixture
def fed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """(model role, positions fed, last row of logits) of every forward call, in order."""
    calls: list[Call] = []
    forward = DecoderState.forward

    def counting(self, token_ids, features=None, last_only=False):  # type: ignore[no-untyped-def]
        logits = forward(self, token_ids, features, last_only)
        calls.append((self.spec.role, len(token_ids), logits[-1].copy()))
        return logits

    monkeypatch.setattr(DecoderState, "forward", counting)
    yield calls


def prefill(calls: list[Call]) -> int:
    """Positions the target's first call of the latest generation fed (its prompt's uncached part)."""
    return next(n for role, n, _ in calls if role == "target")


def test_a_prompt_sharing_a_prefix_feeds_only_the_rest(built, fed):
    pipe = ortspec.load(built, threads=1, max_length=128)
    pipe.generate(PREFIX + ENDINGS[0], **GREEDY, use_draft=False)
    fed.clear()
    second = pipe.generate(PREFIX + ENDINGS[1], **GREEDY, use_draft=False)
    assert second.stats.cached_tokens == len(PREFIX)
    assert prefill(fed) == len(ENDINGS[1])
    fed.clear()
    again = pipe.generate(PREFIX + ENDINGS[1], **GREEDY, use_draft=False)  # all cached: its last token is fed
    assert prefill(fed) == 1 and again.stats.cached_tokens == len(PREFIX + ENDINGS[1]) - 1
    assert again.token_ids == second.token_ids


def test_without_the_cache_every_prompt_is_fed_whole(built, fed):
    pipe = ortspec.load(built, threads=1, max_length=128, prefix_cache=False)
    pipe.generate(PREFIX + ENDINGS[0], **GREEDY, use_draft=False)
    fed.clear()
    assert pipe.generate(PREFIX + ENDINGS[1], **GREEDY, use_draft=False).stats.cached_tokens == 0
    assert prefill(fed) == len(PREFIX + ENDINGS[1])


def conversation(pipe: ortspec.Pipeline, options: dict) -> list[tuple[list[int], int]]:
    """(output, cached prompt tokens) of prompts sharing prefixes: other endings, a follow-up of an answer
    (a chat's next turn), a prompt cut inside the prefix, and an unrelated one."""
    results = []
    answer: list[int] = []
    for prompt in (
        PREFIX + ENDINGS[0],
        PREFIX + ENDINGS[1],
        PREFIX + ENDINGS[0],
        "follow-up",
        PREFIX[:25],
        ENDINGS[2] + PREFIX,
    ):
        ids = PREFIX + ENDINGS[0] + answer + ENDINGS[2] if prompt == "follow-up" else prompt
        result = pipe.generate(ids, **GREEDY, **options)
        answer = answer or result.token_ids
        results.append((result.token_ids, result.stats.cached_tokens))
    return results


@pytest.mark.parametrize("options", DRAFTERS, ids=["plain", "suffix", "ngram", "model"])
@pytest.mark.parametrize("batch", [0, 2], ids=["alone", "batched"])
def test_greedy_output_is_the_same_with_and_without_the_cache(built, options, batch):
    cached = conversation(ortspec.load(built, threads=1, max_length=128, batch=batch), options)
    fresh = conversation(ortspec.load(built, threads=1, max_length=128, batch=batch, prefix_cache=False), options)
    assert [ids for ids, _ in cached] == [ids for ids, _ in fresh]
    assert all(reused == 0 for _, reused in fresh)
    reused = [n for _, n in cached]
    assert reused[1] >= len(PREFIX) and reused[2] >= len(PREFIX)  # the second took the first's state
    assert reused[3] >= len(PREFIX + ENDINGS[0]) and reused[4] == 24  # a prompt inside the prefix: all but its last


def test_a_draft_head_reads_the_target_features_of_a_reused_prefix(llama_head_package, fed):
    """The head's first read after a reused prefix gets the target's features of those positions (kept
    with the state), not zeros: its drafts, and the output, are the ones without the cache."""
    cached = ortspec.load(llama_head_package, max_length=128)
    fresh = ortspec.load(llama_head_package, max_length=128, prefix_cache=False)
    options = dict(**GREEDY, draft="model", draft_tokens=3)
    for prompt in (PREFIX + ENDINGS[0], PREFIX + ENDINGS[1]):
        fed.clear()
        with_cache = cached.generate(prompt, **options)
        drafts_with = [(n, logits) for role, n, logits in fed if role == "draft"]
        fed.clear()
        without = fresh.generate(prompt, **options)
        drafts_without = [(n, logits) for role, n, logits in fed if role == "draft"]
        assert with_cache.token_ids == without.token_ids
        assert [n for n, _ in drafts_with] == [n for n, _ in drafts_without] and drafts_with
        for (_, got), (_, want) in zip(drafts_with, drafts_without, strict=True):
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], atol=1e-3)
    assert with_cache.stats.cached_tokens == len(PREFIX) and with_cache.stats.drafter == "head"


def test_a_chats_next_turn_feeds_only_what_is_new(chat_package, fed):
    """Each turn reuses the whole conversation before it: what the model answered (as far as its text
    encodes back to the same tokens) and every earlier turn; the last turn feeds little more than its message."""
    pipe = ortspec.load(chat_package, max_length=256)
    messages = [{"role": "system", "content": "Be terse."}]
    previous: list[int] = []  # the previous turn's prompt
    held: list[int] = []  # what its state holds: that prompt and the answer, whose last token was never fed
    for turn in range(5):
        messages.append({"role": "user", "content": f"question {turn}?"})
        prompt = pipe.chat_prompt(messages)
        fed.clear()
        result = pipe.chat(messages, max_new_tokens=8, use_draft=False)
        cached = result.stats.cached_tokens
        assert cached == shared_prefix(held, prompt[:-1]) and prefill(fed) == len(prompt) - cached
        assert cached >= len(previous)  # fed: the answer's text (where it encodes otherwise) and the new message
        messages.append({"role": "assistant", "content": result.text})
        previous, held = prompt, prompt + result.token_ids[:-1]


def test_idle_states_are_evicted_least_recently_used_first_within_the_byte_bound(built):
    pipe = ortspec.load(built, threads=1, max_length=64)
    one = DecoderState(pipe.target).nbytes()
    pool = StatePool(pipe.target, size=10, max_bytes=2 * one + one // 2)
    states = [pool.take() for _ in range(4)]
    for i, state in enumerate(states):
        state.forward(PREFIX[:MIN_REUSE] + [i] * 4)  # each holds a sequence of its own
        pool.give(state)
        assert pool.idle_bytes <= pool.max_bytes
    assert pool.idle == 2
    assert pool.take(PREFIX[:MIN_REUSE] + [3] * 5) is states[3]  # the two given last are kept
    assert pool.take(PREFIX[:MIN_REUSE] + [2] * 5) is states[2]
    pool.give(states[2])
    pool.give(states[3])  # now the most recently used
    pool.give(DecoderState(pipe.target))
    assert pool.idle == 2 and pool.take(PREFIX[:MIN_REUSE] + [3] * 5) is states[3]
    assert pool.take(PREFIX[:MIN_REUSE] + [2] * 5) is not states[2]  # evicted


def test_a_bound_below_one_state_keeps_none(built):
    pipe = ortspec.load(built, threads=1, max_length=64, idle_bytes=1000)
    first = pipe.generate(PREFIX + ENDINGS[0], **GREEDY, use_draft=False)
    assert pipe.target_states.idle == 0
    again = pipe.generate(PREFIX + ENDINGS[0], **GREEDY, use_draft=False)
    assert again.stats.cached_tokens == 0 and again.token_ids == first.token_ids


@pytest.mark.parametrize("batch", [0, 2], ids=["alone", "batched"])
def test_generations_running_at_once_never_share_a_state(built, batch):
    """Two streams of one prompt, both wanting the state that holds it: one gets it, the other another."""
    pipe = ortspec.load(built, threads=1, max_length=128, batch=batch)
    prompt = PREFIX + ENDINGS[0]
    alone = pipe.generate(prompt, **GREEDY, use_draft=False).token_ids
    taken: list[DecoderState] = []
    take = pipe.target_states.take

    def recording(prompt=None):  # type: ignore[no-untyped-def]
        taken.append(take(prompt))
        return taken[-1]

    pipe.target_states.take = recording  # type: ignore[method-assign]
    streams = [pipe.stream(prompt, **GREEDY, use_draft=False) for _ in range(2)]
    for stream in streams:
        next(stream)
    assert len(taken) == 2 and taken[0] is not taken[1]
    for stream in streams:
        list(stream)
        assert stream.result is not None and stream.result.token_ids == alone
    assert sorted(stream.result.stats.cached_tokens > 0 for stream in streams) == [False, True]


def test_a_free_row_keeps_its_sequence_while_other_rows_step(built):
    """A row released while another decodes is in range of that row's batched calls: their throwaway
    entries land past its sequence, which a later prompt then reuses."""
    pipe = ortspec.load(built, threads=1, max_length=128, batch=2)
    assert pipe.batch is not None
    first = pipe.stream(PREFIX + ENDINGS[0], **GREEDY, use_draft=False)
    other = pipe.stream(ENDINGS[2], max_new_tokens=30, use_draft=False)
    next(first)  # row 0
    next(other)  # row 1
    list(first)  # row 0 is free, holding its sequence
    held = [np.array(buffer[0, :, : len(PREFIX)]) for buffer in pipe.batch.buffers]
    list(other)  # its steps bind rows 0 and 1
    for buffer, kept in zip(pipe.batch.buffers, held, strict=True):
        assert np.array_equal(buffer[0, :, : len(PREFIX)], kept)
    again = pipe.generate(PREFIX + ENDINGS[1], **GREEDY, use_draft=False)
    assert again.stats.cached_tokens == len(PREFIX)
    plain = ortspec.load(built, threads=1, max_length=128, prefix_cache=False)
    assert again.token_ids == plain.generate(PREFIX + ENDINGS[1], **GREEDY, use_draft=False).token_ids
