"""The public runtime object: `ortspec.load(path)` -> `Pipeline.generate(...)` / `Pipeline.stream(...)`."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .decoder import ContextLengthError, Decoder
from .drafting import DraftModelProposer
from .manifest import Manifest, load_manifest
from .speculative import LoopStats, greedy_speculative
from .tokenizer import TextTokenizer

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class GenerationStats:
    """How a generation went: speed, calls and how many drafts the target accepted."""

    prompt_tokens: int
    new_tokens: int
    target_calls: int
    draft_calls: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None  # accepted / drafted; None when nothing was drafted
    tokens_per_target_call: float  # new tokens / target calls after the prefill
    seconds: float  # wall time of the whole generation, prefill included
    time_to_first_token: float
    tokens_per_second: float  # new tokens / seconds
    draft_tokens: int  # γ: drafts proposed per round (0 for plain decoding)
    accepted_per_round: tuple[int, ...]  # drafts the target accepted in each speculative round
    finish_reason: str  # "eos" or "length"


@dataclass(frozen=True)
class GenerationResult:
    """New text, the new token ids (eos included when it ended the generation), and stats."""

    text: str
    token_ids: list[int]
    stats: GenerationStats


class TextStream:
    """Iterator of text deltas from `Pipeline.stream`; `.result` holds the full result once exhausted."""

    def __init__(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)


class Pipeline:
    """A loaded deployment package: target, optional draft and tokenizer, ready to generate."""

    def __init__(self, manifest: Manifest, target: Decoder, draft: Decoder | None, tokenizer: TextTokenizer) -> None:
        self.manifest = manifest
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(manifest.tokenizer.eos_token_ids)
        shared = manifest.compatibility.get("shared_vocab_size")
        self._proposer = DraftModelProposer(draft, shared) if draft is not None else None

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{self.target.vocab_size - 1})"
                )
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    def _check_lengths(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        limit = self.target.max_length
        if len(prompt_ids) + max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"context of {limit} positions (model maximum {self.target.spec.max_positions}; "
                f"load with max_length= to change it); shorten the prompt or lower max_new_tokens "
                f"(at most {max(limit - len(prompt_ids), 0)} new tokens fit)"
            )

    def _run(
        self, prompt: Prompt, max_new_tokens: int, use_draft: bool, draft_tokens: int
    ) -> Generator[list[int], None, GenerationStats]:
        """Yield the committed tokens round by round; return the stats."""
        prompt_ids = self._prompt_ids(prompt)
        self._check_lengths(prompt_ids, max_new_tokens)
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        proposer = self._proposer if use_draft else None
        draft_calls_before = proposer.calls if proposer else 0
        loop = LoopStats()
        start = time.perf_counter()
        first_token_at = None
        new_tokens = 0
        for chunk in greedy_speculative(
            self.target, prompt_ids, max_new_tokens, self.eos_token_ids, proposer, draft_tokens, loop
        ):
            first_token_at = first_token_at or time.perf_counter()
            new_tokens += len(chunk)
            yield chunk
        seconds = time.perf_counter() - start
        verify_calls = loop.target_calls - 1
        return GenerationStats(
            prompt_tokens=len(prompt_ids),
            new_tokens=new_tokens,
            target_calls=loop.target_calls,
            draft_calls=(proposer.calls - draft_calls_before) if proposer else 0,
            drafted_tokens=loop.drafted,
            accepted_tokens=loop.accepted,
            acceptance_rate=loop.accepted / loop.drafted if loop.drafted else None,
            tokens_per_target_call=(new_tokens - 1) / verify_calls if verify_calls else float(new_tokens),
            seconds=seconds,
            time_to_first_token=(first_token_at or start) - start,
            tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
            draft_tokens=draft_tokens if proposer else 0,
            accepted_per_round=tuple(loop.accepted_per_round),
            finish_reason=loop.finish_reason,
        )

    def generate(
        self, prompt: Prompt, *, max_new_tokens: int = 128, use_draft: bool = True, draft_tokens: int = 4
    ) -> GenerationResult:
        """Greedy generation; with the draft (if the package has one) it is speculative and lossless.

        `prompt` is text (encoded with the tokenizer's special tokens) or a list of token ids used
        as-is. `draft_tokens` is γ, the drafts proposed per target call.
        """
        ids: list[int] = []
        rounds = self._run(prompt, max_new_tokens, use_draft, draft_tokens)
        while True:
            try:
                ids.extend(next(rounds))
            except StopIteration as finished:
                return GenerationResult(self.tokenizer.decode(ids), ids, finished.value)

    def stream(
        self, prompt: Prompt, *, max_new_tokens: int = 128, use_draft: bool = True, draft_tokens: int = 4
    ) -> TextStream:
        """Like `generate`, but yields text deltas as tokens are committed; see `TextStream.result`."""
        rounds = self._run(prompt, max_new_tokens, use_draft, draft_tokens)
        decoder = self.tokenizer.stream()

        def deltas() -> Iterator[str]:
            ids: list[int] = []
            while True:
                try:
                    chunk = next(rounds)
                except StopIteration as finished:
                    text_stream.result = GenerationResult(self.tokenizer.decode(ids), ids, finished.value)
                    return
                ids.extend(chunk)
                if text := decoder.push(chunk):
                    yield text

        text_stream = TextStream(deltas())
        return text_stream


def load(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    draft_providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_length: int | None = None,
    verify: bool = True,
) -> Pipeline:
    """Open a deployment package written by `ortspec export`.

    `providers` are ONNX Runtime execution providers in priority order (default: CPU);
    `draft_providers` (default: the same) lets the draft run elsewhere; `threads` sets intra-op
    threads; `max_length` caps prompt + new tokens (default: the model's maximum, at most 4096; the
    shared KV buffers are allocated for it); `verify=False` skips the sha256 check (sizes are
    always checked).
    """
    manifest = load_manifest(path, verify=verify)
    root = manifest.root
    target = Decoder.load(manifest.target, root, providers, threads, max_length)
    draft = None
    if manifest.draft is not None:
        draft = Decoder.load(manifest.draft, root, draft_providers or providers, threads, max_length)
    return Pipeline(manifest, target, draft, TextTokenizer(root / "tokenizer"))
