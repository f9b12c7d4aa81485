"""Continuous batching: generations decoding at once share target calls, and each still gets the
output it gets alone, whoever joins, leaves or is cancelled meanwhile."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

import ortspec
from ortspec.runtime.model.batching import BatchedModel, RowState, batch_problem
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.package.manifest import file_entry
from ortspec.runtime.speculation.auto_length import AcceptanceEstimate, AutoState

from helpers.batching import start_together
from helpers.waiting import wait_until

ROWS = 4
PROMPTS = [[int(t) for t in np.random.default_rng(seed).integers(2, 300, size=2 + 5 * seed)] for seed in range(ROWS)]
REPEATING = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # drafters find proposals in it


@pytest.fixture(scope="module")
def built(package: Callable[..., Path]) -> Path:
    return package("llama", draft="close", exporter="builder")


@pytest.fixture(scope="module")
def alone(built: Path) -> ortspec.Pipeline:
    return ortspec.load(built, threads=1, max_length=64)


@pytest.fixture
def batched(built: Path) -> ortspec.Pipeline:
    """Batching with a long wait: every decoding row joins every step, so the batches are predictable."""
    pipe = ortspec.load(built, threads=1, max_length=64, batch=ROWS)
    assert pipe.batch is not None
    pipe.batch.wait = 5.0
    return pipe


def run_all(pipe: ortspec.Pipeline, jobs: list[tuple[list[int], dict]]) -> list[list[int]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(pipe.generate, prompt, **options) for prompt, options in jobs]
        return [future.result(timeout=120).token_ids for future in futures]


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_batched_greedy_output_equals_each_generation_alone(alone, batched, rows):
    jobs = [(PROMPTS[i], dict(max_new_tokens=10 + 4 * i, use_draft=False)) for i in range(rows)]
    start_together(batched, rows)
    got = run_all(batched, jobs)
    assert got == [alone.generate(prompt, **options).token_ids for prompt, options in jobs]
    assert batched.batch.widest == rows  # all of them stepped in one call
    assert batched.batch.calls < batched.batch.stepped or rows == 1
    assert batched.batch.in_use == 0  # every row was handed back


def test_a_row_slow_to_come_back_keeps_its_newest_entry(alone, built):
    """A row whose thread is slow after a step (sampling, handing text over) sits out the next batched
    calls, which write a throwaway entry past its end: the entry its step wrote must count by then."""
    pipe = ortspec.load(built, threads=1, max_length=64, batch=2)
    pipe.batch.wait = 0.0005
    step = pipe.batch.step

    def slow_step(state: RowState, token: int) -> np.ndarray:
        logits = step(state, token)
        if state.row == 0:
            time.sleep(0.003)
        return logits

    pipe.batch.step = slow_step
    jobs = [
        (PROMPTS[2], dict(max_new_tokens=16, use_draft=False)),
        (PROMPTS[3], dict(max_new_tokens=40, use_draft=False)),
    ]
    start_together(pipe, 2)
    assert run_all(pipe, jobs) == [alone.generate(prompt, **options).token_ids for prompt, options in jobs]
    assert pipe.batch.calls > pipe.batch.stepped / 2  # the slow row sat out calls of the other


def test_rows_with_drafters_verify_alone_and_step_together(alone, batched):
    """Drafting rows verify batch-1 on their row between the batched steps of the others (which write a
    throwaway entry on the drafting rows): the outputs are still each row's own."""
    jobs = [
        (REPEATING, dict(max_new_tokens=24, draft="ngram", draft_tokens=3)),
        (PROMPTS[1], dict(max_new_tokens=24, draft="model", draft_tokens=2)),
        (PROMPTS[2], dict(max_new_tokens=24, use_draft=False)),
        (REPEATING[:7], dict(max_new_tokens=24, draft="suffix", draft_tokens=3)),
    ]
    start_together(batched, len(jobs))
    got = run_all(batched, jobs)
    assert got == [alone.generate(prompt, **options).token_ids for prompt, options in jobs]
    assert batched.batch.widest >= 2


def test_rows_join_leave_and_cancel_mid_run(alone, batched):
    """A generation decodes; another joins once it is under way (and they step together), then leaves
    first; a third is cancelled after a few tokens and its row is free at once."""
    long_job = (PROMPTS[3], dict(max_new_tokens=40, use_draft=False))
    late_job = (PROMPTS[1], dict(max_new_tokens=10, use_draft=False))
    results: dict[str, list[int]] = {}

    def long_run() -> None:
        stream = batched.stream(long_job[0], **long_job[1])
        for index, _ in enumerate(stream):
            if index == 3:  # under way: let the late one join before going on
                late.start()
                assert wait_until(lambda: batched.batch.in_use == 2, timeout=30, poll=0.001)
        results["long"] = stream.result.token_ids

    def late_run() -> None:
        results["late"] = batched.generate(late_job[0], **late_job[1]).token_ids

    late = threading.Thread(target=late_run)
    first = threading.Thread(target=long_run)
    first.start()
    first.join(60)
    late.join(60)
    assert results["long"] == alone.generate(long_job[0], **long_job[1]).token_ids
    assert results["late"] == alone.generate(late_job[0], **late_job[1]).token_ids
    assert batched.batch.widest == 2 and batched.batch.in_use == 0

    batched.batch.wait = 0.05  # the cancelled stream is read by this thread: steps must not wait long for it
    other = threading.Thread(
        target=lambda: results.update(other=batched.generate(*long_job[:1], **long_job[1]).token_ids)
    )
    other.start()
    stream = batched.stream(PROMPTS[0], max_new_tokens=40, use_draft=False)
    next(stream)
    next(stream)
    held = batched.batch.in_use
    stream.close()  # cancelled: its row goes back before close returns
    assert batched.batch.in_use == held - 1
    other.join(60)
    assert results["other"] == results["long"]
    assert batched.batch.in_use == 0


def test_more_generations_than_rows_decode_in_states_of_their_own(alone, built):
    pipe = ortspec.load(built, threads=1, max_length=64, batch=2)
    jobs = [(PROMPTS[i % ROWS], dict(max_new_tokens=12, use_draft=False)) for i in range(5)]
    start_together(pipe, 5)
    assert run_all(pipe, jobs) == [alone.generate(prompt, **options).token_ids for prompt, options in jobs]
    assert pipe.batch.in_use == 0


def test_packages_that_cannot_batch_decode_per_request(package):
    """Optimum's concat graphs (and batch-1 graphs of older packages) load as before, unbatched."""
    pipe = ortspec.load(package("llama", draft=None, exporter="optimum"), threads=1, max_length=64, batch=ROWS)
    assert pipe.batch is None
    assert "concat" in batch_problem(pipe.target)
    with pytest.raises(ValueError, match="cannot batch: its graph has the concat KV layout"):
        BatchedModel(pipe.target, 2)
    assert len(pipe.generate(PROMPTS[0], max_new_tokens=4).token_ids) == 4


def test_builder_packages_of_older_versions_with_a_batch_of_1_still_load_unbatched(built, alone, tmp_path):
    """Graphs built before the batch became dynamic declare a batch of 1: they load and decode per request."""
    root = tmp_path / "old"
    shutil.copytree(built, root)
    graph_path = root / "target" / "model.onnx"
    graph = onnx.load(graph_path)
    for value in [*graph.graph.input, *graph.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = 1  # as the builder declared it before
    onnx.save(graph, graph_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["target"]["files"][0] = dataclasses.asdict(file_entry(root, graph_path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    pipe = ortspec.load(root, threads=1, max_length=64, batch=ROWS)
    assert pipe.batch is None
    assert "fixed batch of 1" in batch_problem(pipe.target)
    options = dict(max_new_tokens=8, use_draft=False)
    assert pipe.generate(PROMPTS[1], **options).token_ids == alone.generate(PROMPTS[1], **options).token_ids


def test_the_default_pair_batches():
    """Its cached package is exported afresh when the graphs change (GRAPH_REVISION): one cached by an
    ortspec of batch-1 graphs would otherwise be served unbatched."""
    from ortspec.models.default_pair import default_package

    pipe = ortspec.load(default_package(report=lambda _: None), threads=1, max_length=64, batch=2)
    assert pipe.batch is not None, batch_problem(pipe.target)


def test_batched_rows_carry_their_own_features(built):
    """A target that keeps its final features (the head's input; `distill` writing chats) hands each row its
    own from a batched call: the features, like the tokens, are the ones the sequence gets alone."""
    from ortspec.export.distill.features import greedy_answer
    from ortspec.runtime.model.onnx_model import Model
    from ortspec.runtime.package.manifest import load_manifest

    manifest = load_manifest(built)
    model = Model.load(manifest.target, manifest.root, threads=1, max_length=64, keep_hidden=True)
    batch = BatchedModel(model, 3, wait=5.0)
    expected = [greedy_answer(DecoderState(model), PROMPTS[i], 8 + 3 * i, ()) for i in range(3)]
    rows = [batch.take() for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: greedy_answer(rows[i], PROMPTS[i], 8 + 3 * i, ()), range(3)))
    assert batch.widest == 3
    for (tokens, features), (want_tokens, want_features) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(features.astype(np.float32), want_features.astype(np.float32), atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def head_package(checkpoint, tmp_path_factory) -> Path:
    from ortspec.export import export_pair

    from helpers.heads import make_head

    root = tmp_path_factory.mktemp("head")
    make_head(checkpoint("llama"), root / "head")
    export_pair(checkpoint("llama"), root / "pkg", draft=root / "head", quantize="none", report=lambda _: None)
    return root / "pkg"


def test_a_target_with_a_draft_head_batches(head_package):
    """The head drafts per row from the features its row's batched steps carry; greedy output is each
    generation's own, drafting or not."""
    alone_pipe = ortspec.load(head_package, threads=1, max_length=64)
    pipe = ortspec.load(head_package, threads=1, max_length=64, batch=ROWS)
    assert pipe.batch is not None
    pipe.batch.wait = 5.0
    jobs = [
        (PROMPTS[1], dict(max_new_tokens=20, draft_tokens=1)),
        (PROMPTS[2], dict(max_new_tokens=20, use_draft=False)),
        (PROMPTS[3], dict(max_new_tokens=20, use_draft=False)),
    ]
    start_together(pipe, len(jobs))
    assert run_all(pipe, jobs) == [alone_pipe.generate(prompt, **options).token_ids for prompt, options in jobs]
    assert pipe.batch.widest >= 2


def test_auto_gamma_drafts_alone_and_steps_plainly_in_a_full_batch(head_package):
    """Auto γ weighs a drafted round (its verify call alone) against what a plain round adds to the
    batched step: with three rows decoding, a head that pays alone does not draft, and every output is
    still the one the generation gets alone."""
    from helpers.calibrations import synthetic

    cheap = synthetic(draft_ms=0.5, verify_growth=0.1)  # alone, a good head pays; a row adds 1 ms to a step
    alone_pipe = ortspec.load(head_package, threads=1, max_length=64)
    pipe = ortspec.load(head_package, threads=1, max_length=64, batch=ROWS)
    pipe.batch.wait = 5.0
    for each in (alone_pipe, pipe):
        each._calibration = cheap
        each._auto_states[":head"] = AutoState(AcceptanceEstimate(prior=0.95, strength=1000))  # guesses well
    options = dict(draft="model", draft_tokens="auto")
    jobs = [(PROMPTS[i], dict(max_new_tokens=n)) for i, n in ((1, 8), (2, 24), (3, 24))]
    solo = [alone_pipe.generate(prompt, **options, **o) for prompt, o in jobs]
    assert all(result.stats.drafted_tokens for result in solo)  # alone, it drafts
    start_together(pipe, len(jobs))
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = [f.result(timeout=120) for f in [pool.submit(pipe.generate, p, **options, **o) for p, o in jobs]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in solo]
    first = batched[0].stats  # the shortest: it ran while all three rows were held
    assert first.drafted_tokens == 0 and first.undrafted_rounds > 0
    assert pipe.batch.widest == 3
