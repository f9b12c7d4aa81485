"""An fp16 KV cache (`export --kv-dtype fp16`): half the cache's bytes everywhere the runtime allocates one,
logits close to the fp32 cache's, speculative greedy output equal to the package's own plain greedy, and
batching and the prefix cache working on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

import ortspec
from ortspec.runtime.model.decoder import DecoderState

from helpers.batching import start_together

PROMPTS = [[int(t) for t in np.random.default_rng(seed).integers(2, 300, size=6 + 5 * seed)] for seed in range(3)]
MAX_NEW = 16


@pytest.fixture(scope="module")
def half(package: Callable[..., Path]) -> Path:
    """The tiny llama pair (a close draft LM), builder graphs, both with fp16 KV caches."""
    return package("llama", draft="close", exporter="builder", kv_dtype="fp16")


@pytest.fixture(scope="module")
def full(package: Callable[..., Path]) -> Path:
    return package("llama", draft="close", exporter="builder")


def test_the_graph_manifest_and_buffers_hold_fp16(half, full):
    pipe, reference = ortspec.load(half, max_length=64), ortspec.load(full, max_length=64)
    for spec in (pipe.manifest.target, pipe.manifest.draft):
        assert spec is not None and (spec.dtype, spec.kv_dtype) == ("float32", "float16")
    assert reference.manifest.target.kv_dtype == "float32"
    graph = onnx.load(half / pipe.manifest.target.onnx, load_external_data=False)
    cache = [v.type.tensor_type.elem_type for v in graph.graph.input if v.name.startswith("past_key_values.")]
    assert cache and set(cache) == {onnx.TensorProto.FLOAT16}
    logits = next(v for v in graph.graph.output if v.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # only the cache changed
    assert pipe.target.cache_bytes() * 2 == reference.target.cache_bytes()
    state = DecoderState(pipe.target)
    assert {b.data_type() for b in state.cache.buffers} == {"tensor(float16)"}
    assert state.nbytes() * 2 == DecoderState(reference.target).nbytes()


def test_logits_are_close_to_the_fp32_caches_step_by_step(half, full):
    tokens = PROMPTS[2] + [7, 8, 9, 10, 11, 12]
    rows = {}
    for name, path in (("half", half), ("full", full)):
        state = DecoderState(ortspec.load(path, max_length=64).target)
        prompt = state.forward(tokens[:12])
        steps = [state.forward([t])[0] for t in tokens[12:]]  # these read the cache written before them
        rows[name] = np.vstack([prompt, *steps])
    scale = np.abs(rows["full"]).max()
    assert np.abs(rows["half"] - rows["full"]).max() <= 1e-2 * scale
    assert (rows["half"].argmax(-1) == rows["full"].argmax(-1)).all()


@pytest.mark.parametrize(
    "options",
    [dict(draft_tokens=1), dict(draft_tokens=4), dict(draft="ngram", draft_tokens=3), dict(draft="suffix")],
    ids=["model-1", "model-4", "ngram", "suffix"],
)
def test_speculative_greedy_equals_the_packages_plain_greedy(half, options):
    pipe = ortspec.load(half, max_length=128)
    for prompt in PROMPTS:
        plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
        spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, **options)
        assert spec.token_ids == plain.token_ids


def test_batched_rows_and_the_prefix_cache_give_the_output_of_each_generation_alone(half):
    alone = ortspec.load(half, threads=1, max_length=64, prefix_cache=False)
    expected = [alone.generate(p, max_new_tokens=MAX_NEW, use_draft=False).token_ids for p in PROMPTS]
    batched = ortspec.load(half, threads=1, max_length=64, batch=len(PROMPTS))
    assert batched.batch is not None and batched.batch.buffers[0].dtype == np.float16
    batched.batch.wait = 5.0  # every row joins every step
    start_together(batched, len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(batched.generate, p, max_new_tokens=MAX_NEW, use_draft=False) for p in PROMPTS]
        assert [f.result(timeout=120).token_ids for f in futures] == expected
    assert batched.batch.widest == len(PROMPTS)
    del batched.target_states.take  # start_together's barrier: later generations start alone
    again = batched.generate(PROMPTS[2] + [5], max_new_tokens=MAX_NEW, use_draft=False)  # reuses a kept row
    assert again.stats.cached_tokens == len(PROMPTS[2])
    assert again.token_ids == alone.generate(PROMPTS[2] + [5], max_new_tokens=MAX_NEW, use_draft=False).token_ids


def test_a_package_without_the_field_loads_as_before(full, tmp_path):
    import shutil

    root = tmp_path / "old"
    shutil.copytree(full, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for role in ("target", "draft"):
        manifest[role].pop("kv_dtype")
    (root / "manifest.json").write_text(json.dumps(manifest))
    pipe = ortspec.load(root, max_length=64)
    assert pipe.manifest.target.kv_dtype is None
    assert pipe.generate(PROMPTS[0], max_new_tokens=4).token_ids


def test_an_fp16_cache_needs_the_builders_fp32_graph(checkpoint, tmp_path):
    from ortspec.export import export_pair

    with pytest.raises(ValueError, match="--kv-dtype fp16 needs the builder's fp32 graph for the target"):
        export_pair(checkpoint("llama"), tmp_path / "p", exporter="optimum", kv_dtype="fp16", report=lambda _: None)
    with pytest.raises(ValueError, match="kv_dtype must be one of fp32, fp16, got 'int8'"):
        export_pair(checkpoint("llama"), tmp_path / "q", kv_dtype="int8", report=lambda _: None)


def test_a_draft_head_keeps_its_fp32_cache_beside_an_fp16_target(checkpoint, tmp_path):
    from ortspec.export import export_pair

    from helpers.heads import make_head

    head = make_head(checkpoint("llama"), tmp_path / "head")
    out = tmp_path / "pkg"
    export_pair(checkpoint("llama"), out, draft=head, quantize="none", kv_dtype="fp16", report=lambda _: None)
    pipe = ortspec.load(out, max_length=128)
    assert pipe.manifest.draft is not None and pipe.manifest.draft.is_head
    assert (pipe.manifest.target.kv_dtype, pipe.manifest.draft.kv_dtype) == ("float16", "float32")
    for prompt in PROMPTS:
        plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
        spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=3)
        assert spec.stats.drafted_tokens > 0
        assert spec.token_ids == plain.token_ids
