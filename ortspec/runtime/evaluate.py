"""What a package's quantization costs in quality, measured torch-free on a text.

Perplexity of the package on the text, and, against a reference package of the same model (e.g. its
fp32 export), how often their top-1 tokens agree and the mean KL(reference || package) of their
next-token distributions. The text is cut into windows of `window` tokens that are read from scratch
(each prediction sees only earlier tokens of its window), in chunks that bound the logits held.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model
from ortspec.runtime.text.tokenizer import TextTokenizer

CHUNK = 128  # positions per call: bounds the logits in memory (CHUNK x vocab floats) at any vocabulary


@dataclass(frozen=True)
class EvalReport:
    """Quality of a package on a text; the reference fields are None without a reference."""

    tokens: int  # predicted positions
    perplexity: float
    reference_perplexity: float | None
    top1_agreement: float | None  # share of positions whose argmax equals the reference's
    mean_kl: float | None  # mean KL(reference || package), nats per position
    seconds: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64 so that small KLs are not rounding noise."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_probs: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return log_probs


def windows(tokens: Sequence[int], window: int, prefix: Sequence[int] = ()) -> list[list[int]]:
    """The text's tokens cut into windows of at most `window` tokens, each led by `prefix` (e.g. BOS)."""
    room = window - len(prefix)
    if room < 2:
        raise ValueError(f"window must exceed the {len(prefix)} prefix tokens by at least 2, got {window}")
    pieces = [list(prefix) + list(tokens[i : i + room]) for i in range(0, len(tokens), room)]
    return [p for p in pieces if len(p) >= 2]  # a window of one token predicts nothing


def special_prefix(tokenizer: TextTokenizer) -> list[int]:
    """What the tokenizer puts before a text (e.g. BOS): models are trained to read texts after it."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def _window_logprobs(decoder: DecoderState, window: Sequence[int]) -> list[np.ndarray]:
    """Log-probabilities of every position of `window` but the last, one array per chunk."""
    decoder.reset()
    out = []
    for start in range(0, len(window) - 1, CHUNK):
        out.append(log_softmax(decoder.forward(window[start : min(start + CHUNK, len(window) - 1)])))
    return out


def evaluate(
    target: Model,
    token_windows: Sequence[Sequence[int]],
    reference: Model | None = None,
    on_window: Callable[[int], None] = lambda positions: None,
) -> EvalReport:
    """Perplexity of `target` on the windows; agreement and KL against `reference` when given."""
    if reference is not None and reference.vocab_size != target.vocab_size:
        raise ValueError(
            f"the reference scores {reference.vocab_size} tokens and the package {target.vocab_size}: "
            "compare packages of the same model"
        )
    started = time.perf_counter()
    state, ref_state = DecoderState(target), DecoderState(reference) if reference is not None else None
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for window in token_windows:
        nexts = np.asarray(window[1:], np.int64)
        chunks = _window_logprobs(state, window)
        ref_chunks = _window_logprobs(ref_state, window) if ref_state is not None else [None] * len(chunks)
        offset = 0
        for logp, ref_logp in zip(chunks, ref_chunks, strict=True):
            rows = np.arange(len(logp))
            targets = nexts[offset : offset + len(logp)]
            nll -= float(logp[rows, targets].sum())
            if ref_logp is not None:
                ref_nll -= float(ref_logp[rows, targets].sum())
                agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
            offset += len(logp)
        count += len(nexts)
        on_window(len(nexts))
    if count == 0:
        raise ValueError("the text is too short to evaluate: it needs at least two tokens")
    with_reference = reference is not None
    return EvalReport(
        tokens=count,
        perplexity=float(np.exp(nll / count)),
        reference_perplexity=float(np.exp(ref_nll / count)) if with_reference else None,
        top1_agreement=agree / count if with_reference else None,
        mean_kl=kl / count if with_reference else None,
        seconds=time.perf_counter() - started,
    )
