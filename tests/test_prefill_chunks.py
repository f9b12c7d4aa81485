"""Long calls on the CPU run as consecutive chunks (`PREFILL_CHUNK`): each returns exactly what one call
returns, logits, kept hidden states and generations alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import ortspec
from ortspec.runtime.model import decoder as decoder_module
from ortspec.runtime.model.decoder import DecoderState

PROMPT = [int(t) for t in np.random.default_rng(3).integers(2, 300, size=60)]
CHUNK = 8
WHOLE = 10**9
# Chunks give a whole call's rows bit for bit, but where a GEMM kernel treats a row apart: a call of 33
# rows scores its 33rd (a lone row after 32) 4e-6 off (Xeon, AVX512), as a call of any other shape may
ATOL = 1e-5


def same(got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=what)


def chunked(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", size)


def counted(decoder: DecoderState, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the ONNX calls `decoder` makes from now on."""
    calls: list[int] = []
    run = decoder._run

    def count(tokens: list[int], *args: object, **kwargs: object) -> np.ndarray:
        calls.append(len(tokens))
        return run(tokens, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decoder, "_run", count)
    return calls


def feed(decoder: DecoderState, monkeypatch: pytest.MonkeyPatch, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the prompt's logits, fed on a past of 3 in two calls, then its last row alone after
    rolling back to that past."""
    chunked(monkeypatch, size)
    decoder.reset()
    decoder.forward(PROMPT[:3])
    rows = np.concatenate([decoder.forward(PROMPT[3:36]), decoder.forward(PROMPT[36:])])
    decoder.truncate(3)
    return rows, decoder.forward(PROMPT[3:], last_only=True)


# llama on the builder's GroupQueryAttention graph, mistral's sliding window (4) shorter than a chunk,
# phi3's longrope switching tables at 32 positions (inside the first call: the cache is recomputed with the
# long table in one call, the second call is chunked on the long table, rolling back recomputes the short
# one), and the concat layout of optimum's graphs
@pytest.mark.parametrize(
    ("family", "exporter"), [("llama", "builder"), ("mistral", "builder"), ("phi3", "builder"), ("llama", "optimum")]
)
def test_chunks_return_the_logits_of_one_call(
    package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, family: str, exporter: str
) -> None:
    pipe = ortspec.load(package(family, draft=None, exporter=exporter), max_length=64)
    decoder = DecoderState(pipe.target)
    rows, last = feed(decoder, monkeypatch, WHOLE)
    calls = counted(decoder, monkeypatch)
    chunk_rows, chunk_last = feed(decoder, monkeypatch, CHUNK)
    switch = pipe.target.spec.long_rope_after
    longer = [n for n in calls if n > CHUNK]  # only longrope's recomputing calls, which end past the switch
    assert len(calls) > 8 and (not longer if switch is None else longer and min(longer) > switch)
    assert chunk_rows.shape == rows.shape == (len(PROMPT) - 3, pipe.target.vocab_size)
    assert chunk_last.shape[1:] == last.shape[1:]
    same(chunk_rows, rows)
    same(chunk_last[-1], last[-1])
    same(chunk_last[-1], rows[-1])


def test_other_providers_keep_calls_whole(package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks were measured on the CPU provider alone: a model whose first provider is another (CUDA here,
    in name: the session still runs on the CPU) gets one call."""
    pipe = ortspec.load(package("llama", draft=None, exporter="builder"), max_length=64)
    monkeypatch.setattr(pipe.target, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    decoder = DecoderState(pipe.target)
    calls = counted(decoder, monkeypatch)
    chunked(monkeypatch, CHUNK)
    decoder.forward(PROMPT, last_only=True)
    assert calls == [len(PROMPT)]


def test_rows_get_chunks_too(package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched row's prefill runs through `DecoderState` in chunks, on its own row of the buffers: the
    other row keeps its sequence, and the row's next step (a batched call) reads the whole prompt."""
    built = package("llama", draft=None, exporter="builder")
    batch = ortspec.load(built, max_length=64, batch=2).batch
    assert batch is not None
    other, row = batch.take(), batch.take()
    assert other is not None and row is not None and (other.row, row.row) == (0, 1)
    reference, other_reference = (DecoderState(ortspec.load(built, max_length=64).target) for _ in range(2))
    chunked(monkeypatch, WHOLE)
    whole = reference.forward(PROMPT)
    chunked(monkeypatch, CHUNK)
    held = PROMPT[::-1][:20]
    other.forward(held, last_only=True)
    other_reference.forward(held, last_only=True)
    calls = counted(row, monkeypatch)
    same(row.forward(PROMPT), whole)
    assert max(calls) <= CHUNK and row.length == len(PROMPT)
    same(row.forward([7])[0], reference.forward([7])[0])  # a batched call reads the row's whole prompt
    same(other.forward(PROMPT[:5]), other_reference.forward(PROMPT[:5]))


@pytest.mark.parametrize("draft_tokens", [0, 4])
def test_generation_is_the_same_with_chunks(
    package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, draft_tokens: int
) -> None:
    pipe = ortspec.load(package("llama", draft="close", exporter="builder"), max_length=96, prefix_cache=False)
    outputs = []
    for size in (WHOLE, CHUNK):
        chunked(monkeypatch, size)
        result = pipe.generate(PROMPT, max_new_tokens=12, use_draft=draft_tokens > 0, draft_tokens=draft_tokens or 1)
        outputs.append(result.token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 12


def test_draft_head_reads_the_features_of_every_chunk(
    llama_head_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep_hidden target keeps every position's hidden states, `hidden` spans the whole call, and a head's
    per-position features are cut with its tokens; speculation with the head gives the same text."""
    pipe = ortspec.load(llama_head_package, max_length=96, prefix_cache=False)
    seen, texts = {}, {}
    for size in (WHOLE, CHUNK):
        chunked(monkeypatch, size)
        target, head = DecoderState(pipe.target), DecoderState(pipe.draft)
        target.forward(PROMPT[:3])
        logits = target.forward(PROMPT[3:], last_only=True)
        assert target.hidden_start == 3 and target.hidden.shape == (len(PROMPT) - 3, pipe.target.hidden_size)
        kept = target.hidden_at(0, len(PROMPT)).copy()
        features = kept[:-1] * 0.5  # any per-position features: each row must meet its own token
        head_logits = head.forward(PROMPT[1:], features, last_only=True)
        assert head.hidden_start == 0 and len(head.hidden) == len(PROMPT) - 1
        seen[size] = {
            "logits": logits[-1],
            "hidden": target.hidden.copy(),
            "kept hidden": kept,
            "head logits": head_logits[-1],
            "head hidden": head.hidden.copy(),
        }
        texts[size] = pipe.generate(PROMPT, max_new_tokens=12, draft_tokens=3).token_ids
    for what, expected in seen[WHOLE].items():
        same(seen[CHUNK][what], expected, what)
    assert texts[CHUNK] == texts[WHOLE]
