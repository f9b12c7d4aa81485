"""One Pipeline, many generations at once: threads and interleaved streams each get the output they
would get alone, decoder states are pooled and reused, and a cache out of step with its sequence is
caught (the loop checks it every round) instead of decoding on from the wrong context."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import ortspec
from ortspec.runtime.drafters.model import DraftModelProposer
from ortspec.runtime.errors import CacheStateError
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.state_pool import StatePool
from ortspec.runtime.speculation.calibration import Calibration
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.loop import LoopStats, speculative_decode
from ortspec.runtime.speculation.sampling import SamplingConfig

MAX_NEW = 12
PROMPTS = [[int(t) for t in np.random.default_rng(seed).integers(2, 300, size=3 + 2 * seed)] for seed in range(4)]
GREEDY = dict(max_new_tokens=MAX_NEW)
# auto γ with costs that make drafting pay: exercises the state it shares across generations
CHEAP_DRAFTS = Calibration(
    "test", [64], [[10.0 * (1 + 0.05 * n) for n in range(9)]], [0.5], [[0.5 * g + 10.0 for g in range(1, 9)]], [2.0]
)


@pytest.fixture(scope="module")
def pipe(package: Callable[..., Path]) -> ortspec.Pipeline:
    """A target with a close draft model, shared-buffer caches of 64 positions, one ORT thread per call."""
    return ortspec.load(package("llama", draft="close", exporter="builder"), threads=1, max_length=64)


@pytest.fixture(scope="module")
def head_pipe(llama_head_package: Path) -> ortspec.Pipeline:
    return ortspec.load(llama_head_package, threads=1, max_length=64)


def solo(pipe: ortspec.Pipeline) -> list[list[int]]:
    """Each prompt's greedy output, one generation at a time."""
    return [pipe.generate(prompt, **GREEDY, use_draft=False).token_ids for prompt in PROMPTS]


def in_threads(pipe: ortspec.Pipeline, threads: int, repeats: int, options: dict) -> list[list[list[int]]]:
    """Every thread generates `repeats` times (prompt chosen by thread index), all starting together."""
    barrier = threading.Barrier(threads)

    def work(index: int) -> list[list[int]]:
        barrier.wait()
        prompt = PROMPTS[index % len(PROMPTS)]
        return [pipe.generate(prompt, **GREEDY, **options).token_ids for _ in range(repeats)]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, range(threads)))


OPTIONS = {
    "plain": dict(use_draft=False),
    "model": dict(draft="model", draft_tokens=3),
    "model-auto": dict(draft="model", draft_tokens="auto"),
    "suffix-auto": dict(draft="suffix", draft_tokens="auto"),
    "ngram": dict(draft="ngram", draft_tokens=2),
}


@pytest.mark.parametrize("threads", [4, 8])
@pytest.mark.parametrize("mode", list(OPTIONS))
def test_threads_sharing_a_pipeline_each_get_their_own_output(pipe, threads, mode):
    pipe._calibration = CHEAP_DRAFTS
    expected = solo(pipe)
    created = pipe.target_states.created
    outputs = in_threads(pipe, threads, repeats=3, options=OPTIONS[mode])
    for index, runs in enumerate(outputs):
        assert runs == [expected[index % len(PROMPTS)]] * 3, (mode, index)
    assert pipe.target_states.created - created <= threads  # reused, not made per generation
    assert pipe.target_states.idle <= pipe.target_states.size


def test_threads_with_concat_caches(package):
    """Graphs whose caches are concatenated each call (optimum's): the states swap OrtValues, not buffers."""
    pipe = ortspec.load(package("llama", draft="close", exporter="optimum"), threads=1, max_length=64)
    assert pipe.manifest.target.kv_layout == "concat"
    expected = solo(pipe)
    for options in (OPTIONS["plain"], OPTIONS["model"]):
        for index, runs in enumerate(in_threads(pipe, 4, repeats=2, options=options)):
            assert runs == [expected[index % len(PROMPTS)]] * 2


def test_threads_drafting_with_a_head(head_pipe):
    expected = solo(head_pipe)
    for options in (dict(draft_tokens=3), dict(draft_tokens="adaptive")):
        for index, runs in enumerate(in_threads(head_pipe, 4, repeats=2, options=options)):
            assert runs == [expected[index % len(PROMPTS)]] * 2
    assert head_pipe.draft_states is not None and head_pipe.draft_states.created <= 4


def test_interleaved_streams_are_independent(pipe):
    expected = solo(pipe)
    for options in (OPTIONS["plain"], OPTIONS["model"]):
        streams = [pipe.stream(prompt, **GREEDY, **options) for prompt in PROMPTS[:2]]
        turns, done = [0, 0], [False, False]
        while not all(done):  # advance them in turns
            for index, stream in enumerate(streams):
                if not done[index]:
                    done[index] = next(stream, None) is None
                    turns[index] += not done[index]
        assert min(turns) > 1  # each yielded several deltas: they really took turns
        assert [stream.result.token_ids for stream in streams] == expected[:2]


def test_a_generate_in_the_middle_of_a_stream_leaves_it_alone(pipe):
    expected = solo(pipe)
    stream = pipe.stream(PROMPTS[0], **GREEDY, draft="model", draft_tokens=2)
    first = next(stream)
    middle = pipe.generate(PROMPTS[1], **GREEDY, draft="model", draft_tokens=2)
    rest = list(stream)
    assert middle.token_ids == expected[1]
    assert stream.result is not None and stream.result.token_ids == expected[0]
    assert first + "".join(rest) == stream.result.text


def test_sequential_generations_reuse_one_state_per_model(package):
    pipe = ortspec.load(package("llama", draft="close", exporter="builder"), max_length=64, idle_states=2)
    for prompt in PROMPTS * 2:
        pipe.generate(prompt, **GREEDY, draft="model", draft_tokens=3)
        pipe.generate(prompt, **GREEDY, use_draft=False)
    assert pipe.target_states.created == pipe.draft_states.created == 1
    streams = [pipe.stream(prompt, **GREEDY, draft="model", draft_tokens=3) for prompt in PROMPTS]
    for stream in streams:
        next(stream)  # four generations hold a state each
    del stream
    assert pipe.target_states.created == pipe.draft_states.created == 4 and pipe.target_states.idle == 0
    streams[0].close()  # closed early: its states go back at once
    assert pipe.target_states.idle == 1
    del streams  # dropped unfinished: theirs too, the pool keeping at most two
    assert pipe.target_states.idle == pipe.draft_states.idle == 2


def test_the_pool_frees_the_states_it_drops(pipe):
    pool = StatePool(pipe.target, size=1)
    dropped, kept = pool.take(), pool.take()
    pool.give(dropped)
    gone = [weakref.ref(dropped), weakref.ref(dropped.cache)]
    pool.give(kept)  # the pool is full: it lets the least recently used state go
    del dropped
    assert [ref() for ref in gone] == [None, None]
    assert pool.take() is kept and pool.created == 2


def test_check_names_a_cache_out_of_step(pipe):
    state = DecoderState(pipe.target)
    state.forward([5, 6, 7])
    state.check([5, 6, 7, 8], 0, 3)
    for sequence, end in (([5, 6, 9], 3), ([5, 6, 7, 8], 4), ([5, 6], 3)):
        with pytest.raises(CacheStateError, match="target cache holds 3 positions ending in token 7"):
            state.check(sequence, 0, end)
    with pytest.raises(CacheStateError, match="cannot truncate a cache of 3 positions to 5"):
        state.truncate(5)


def test_a_state_shared_by_two_loops_is_caught(pipe):
    """What one state per Pipeline did when a generation started inside another: the first loop's
    next round finds the cache holding the other sequence and stops, naming the problem."""
    chooser = TokenChooser(SamplingConfig(), np.random.default_rng(0))
    state = DecoderState(pipe.target)
    first = speculative_decode(state, PROMPTS[3], MAX_NEW, set(), chooser)
    next(first)
    list(speculative_decode(state, PROMPTS[0], MAX_NEW, set(), chooser))
    with pytest.raises(CacheStateError):
        next(first)


def test_a_draft_cache_left_with_rejected_drafts_is_caught(pipe):
    class Forgetful(DraftModelProposer):
        def rollback(self, tokens):  # type: ignore[no-untyped-def]
            self._check(tokens)  # never truncates: rejected drafts stay in its cache

    chooser = TokenChooser(SamplingConfig(), np.random.default_rng(0))
    proposer = Forgetful(DecoderState(pipe.draft))
    rounds = speculative_decode(DecoderState(pipe.target), PROMPTS[3], 40, set(), chooser, proposer, None, LoopStats())
    with pytest.raises(CacheStateError, match="draft cache holds"):
        list(rounds)
