"""The public runtime object: `ortspec.load(path)` -> `Pipeline.generate/stream/chat(...)`."""

from __future__ import annotations

import numbers
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .batching import BatchedModel, batch_problem
from .calibration import Calibration, measure
from .calibration import calibration_key as calibration_key_for
from .calibration_store import calibration_files, load_calibration, save_calibration
from .chat import Message, render_chat
from .decoder import ContextLengthError, DecoderState, Model
from .drafting import DraftModelProposer, FeatureHeadProposer, NgramProposer, Proposer
from .hybrid import HybridLength, HybridProposer
from .manifest import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Manifest, load_manifest
from .options import GenerationConfig, check_text
from .sampling import SamplingConfig
from .speculative import (
    AutoDraftLength,
    AutoMemo,
    AutoState,
    DraftLength,
    LoopStats,
    TokenChooser,
    speculative_decode,
)
from .state_pool import DEFAULT_IDLE_STATES, StatePool
from .suffix import SuffixMemory, SuffixProposer
from .tokenizer import TextAssembler, TextTokenizer

Prompt = str | Sequence[int]
DRAFT_MODELS = ("model", "head")  # drafters that cost model calls (a draft LM, or a feature-level head)
WITH_DRAFT_STATE = (*DRAFT_MODELS, "hybrid")  # drafters that decode with the draft model (hybrid: some rounds)
SCORED_DRAFTERS = ("suffix",)  # free drafters that score each token: auto γ sends the best prefix
DEFAULT_DRAFT_THREADS = 1


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
    draft_tokens: int | str  # γ as configured: an integer, "adaptive", or 0 for plain decoding
    drafter: str  # "model" (a draft LM), "head" (a feature-level draft head), "hybrid", "ngram", "suffix" or "none"
    accepted_per_round: tuple[int, ...]  # drafts the target accepted in each speculative round
    drafted_per_round: tuple[int, ...]  # drafts proposed in each round (γ actually used)
    undrafted_rounds: int  # rounds decoded without drafts although drafting was on (auto chose γ=0, no proposal)
    finish_reason: str  # "eos", "length" or "stop"


@dataclass(frozen=True)
class GenerationResult:
    """New text, the new token ids (eos or the stop string's last token included), and stats."""

    text: str
    token_ids: list[int]
    stats: GenerationStats


Events = Generator[tuple[str, GenerationResult | None], None, None]  # text deltas, then ("", the result)


class TextStream:
    """Iterator of text deltas from `Pipeline.stream`; `.result` holds the full result once exhausted.

    Each stream decodes in states of its own: streams advanced in turns, or alongside `generate`
    calls, do not affect one another. `close()` (or dropping the stream) ends it early.
    """

    def __init__(self, events: Events) -> None:
        self._events = events  # held directly, no cycle: a dropped stream ends (and frees its states) at once
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for delta, result in self._events:
            if result is not None:
                self.result = result
            elif delta:
                return delta
        raise StopIteration

    def close(self) -> None:
        """Stop generating and hand the stream's decoder states back to the pipeline."""
        self._events.close()


class Pipeline:
    """A loaded deployment package: target, optional draft and tokenizer, ready to generate.

    Thread-safe: any number of threads may call `generate`, `stream` and `chat` on one pipeline at
    once. The models (`target`, `draft`: sessions and weights) are shared; each generation takes
    decoder states of its own (KV cache, position, drafter) from `target_states` / `draft_states`
    and returns them when it ends, and the pools keep up to `idle_states` of each for reuse. What
    generations learn from one another (auto γ's estimates, suffix drafting's memory) is shared
    under locks. For direct model calls, `pipe.target.new_state()` gives a sequence of your own.

    With `batch` (a `BatchedModel` of the target), generations running at once decode in its rows and
    their one-token target steps share calls (continuous batching); `batch` is None where it is off.
    """

    def __init__(
        self,
        manifest: Manifest,
        target: Model,
        draft: Model | None,
        tokenizer: TextTokenizer,
        calibration_key: str = "",
        idle_states: int = DEFAULT_IDLE_STATES,
        batch: BatchedModel | None = None,
    ) -> None:
        self.manifest = manifest
        self.target = target
        self.draft = draft
        self.batch = batch
        self.target_states = StatePool(target, idle_states, batch)
        self.draft_states = StatePool(draft, idle_states) if draft is not None else None
        self._lock = threading.Lock()  # calibration (measured once) and auto γ's shared state
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(manifest.tokenizer.eos_token_ids)
        self._shared_vocab = manifest.compatibility.get("shared_vocab_size")
        self._calibration_key = calibration_key or calibration_key_for(["CPUExecutionProvider"], None)
        self._calibration: Calibration | None = None
        # told, one line each, when calibration measures, skips a damaged file or stores (a CLI prints them);
        # without it, only the problems are raised as warnings
        self.on_calibrate: Callable[[str], None] | None = None
        self.calibration_file: Path | None = None  # where the last measured calibration was stored (None: nowhere)
        self._auto_states: dict[str, AutoState] = {}  # what auto γ learned per drafter, kept across generations
        self._auto: dict[tuple[str, int], tuple[Calibration, AutoMemo]] = {}  # its cached per-context choices
        # what draft="suffix" keeps across generations: earlier outputs (bounded) and its confidence table
        self.suffix_memory = SuffixMemory()

    def calibration(self, remeasure: bool = False, max_gamma: int = 8) -> Calibration:
        """This machine's step costs for the package, measured on first use and stored beside the
        manifest (in the user cache where the package cannot hold them). Threads asking at once wait for
        one measurement."""
        with self._lock:
            return self._calibrated(remeasure, max_gamma)

    def _calibrated(self, remeasure: bool, max_gamma: int) -> Calibration:
        if self._calibration is None or remeasure:
            files = calibration_files(self.manifest)
            problem = partial(self._tell, problem=True)
            key = self._calibration_key
            stored = None if remeasure else load_calibration(files, key, max_gamma, problem)
            if stored is None:
                self._tell("measuring this machine's step costs for auto γ (once)...")
                stored = measure(self.target, self.draft, key, max_gamma)
                try:
                    self.calibration_file = save_calibration(files, stored)
                    self._tell(f"calibration stored in {self.calibration_file}")
                except OSError as error:
                    self.calibration_file = None
                    problem(f"could not store the calibration, it is measured again next time ({error})")
            self._calibration = stored
        return self._calibration

    def _tell(self, message: str, problem: bool = False) -> None:
        """A calibration message to on_calibrate; without one, problems become warnings."""
        if self.on_calibrate is not None:
            self.on_calibrate(message)
        elif problem:
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _draft_length(self, config: GenerationConfig, drafter: str) -> DraftLength | AutoDraftLength | HybridLength:
        if drafter == "hybrid":  # each of its drafters keeps a policy (and what auto γ learns) of its own
            model = "head" if self.draft.spec.is_head else "model"
            return HybridLength(self._one_length(config, "suffix", "hybrid"), self._one_length(config, model, "hybrid"))
        return self._one_length(config, drafter)

    def _one_length(self, config: GenerationConfig, drafter: str, within: str = "") -> DraftLength | AutoDraftLength:
        """γ's policy for one drafter; `within` names the hybrid it serves (what it learns is kept apart)."""
        if config.draft_tokens == "adaptive":
            return DraftLength(None, config.draft_tokens_max)
        if config.draft_tokens == "auto":
            calibration = self.calibration(max_gamma=config.draft_tokens_max)
            costs = dict(draft_cost=drafter in DRAFT_MODELS, max_gamma=config.draft_tokens_max)
            scored = drafter in SCORED_DRAFTERS
            if _reproducible(config):
                # γ choices that depend on neither timings nor earlier generations (the samples depend
                # on them), only on the stored calibration and this generation's acceptance.
                return AutoDraftLength(calibration, AutoState(), **costs, learn_timings=False, scored=scored)
            key = (within, drafter, config.draft_tokens_max)
            with self._lock:
                memo = self._auto.get(key)
                if memo is None or memo[0] is not calibration:  # reuse the cached per-context costs
                    memo = self._auto[key] = (calibration, AutoMemo())
                state = self._auto_states.setdefault(f"{within}:{drafter}", AutoState())
            return AutoDraftLength(calibration, state, **costs, scored=scored, memo=memo[1])
        return DraftLength(int(config.draft_tokens))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(check_text("the prompt", prompt))
        else:
            ids = self._token_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    def _token_ids(self, prompt: Any) -> list[int]:
        """Token ids given as a prompt, checked: integers (not floats, strings or bools) in the vocabulary."""
        if isinstance(prompt, (bytes, bytearray, memoryview, dict)) or not isinstance(prompt, Iterable):
            raise ValueError(f"the prompt must be text or a sequence of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise ValueError(f"prompt token ids must be integers, got {token!r} at position {position}")
            if not 0 <= token < self.target.vocab_size:
                raise ValueError(f"prompt token id {token} is outside the vocabulary (0..{self.target.vocab_size - 1})")
        return [int(t) for t in ids]

    def _check_lengths(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        limit = self.target.max_length
        if len(prompt_ids) + max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"context of {limit} positions (model maximum {self.target.spec.max_positions}; "
                f"load with max_length= to change it); shorten the prompt or lower max_new_tokens "
                f"(at most {max(limit - len(prompt_ids), 0)} new tokens fit)"
            )

    def _drafter(self, config: GenerationConfig) -> str:
        """Which drafter a generation uses: "model", "head", "hybrid", "ngram", "suffix" or "none"."""
        if not config.use_draft:
            return "none"
        drafter = config.draft or ("hybrid" if self.draft is not None else "suffix")
        if drafter in ("model", "hybrid") and self.draft is None:
            raise ValueError(
                f"the package has no draft model (draft={drafter!r} needs one): export one with --draft, "
                "or use draft='suffix' or 'ngram'"
            )
        if drafter == "model":
            return "head" if self.draft.spec.is_head else "model"
        return drafter

    def _proposer(
        self,
        config: GenerationConfig,
        drafter: str,
        target: DecoderState,
        draft: DecoderState | None,
        length: DraftLength | AutoDraftLength | HybridLength | None,
    ) -> Proposer | None:
        """One generation's proposer, drafting with its own `draft` state (and `target`'s features)."""
        if drafter == "head" or (drafter == "hybrid" and self.draft.spec.is_head):
            model = FeatureHeadProposer(draft, target, self._shared_vocab, config.draft_min_prob)
        elif drafter in ("model", "hybrid"):
            model = DraftModelProposer(draft, self._shared_vocab, config.draft_min_prob)
        if drafter == "hybrid":
            return HybridProposer(SuffixProposer(self._suffix_memory(config)), model, length)
        if drafter in DRAFT_MODELS:
            return model
        if drafter == "ngram":
            return NgramProposer(config.max_ngram_size)
        if drafter == "suffix":
            return SuffixProposer(self._suffix_memory(config))
        return None

    def _suffix_memory(self, config: GenerationConfig) -> SuffixMemory:
        """The pipeline's pool; seeded sampling drafts from this sequence alone: the same seed, the same text."""
        return SuffixMemory() if _reproducible(config) else self.suffix_memory

    @contextmanager
    def _states(self, drafter: str) -> Iterator[tuple[DecoderState, DecoderState | None]]:
        """A target state, and a draft state for drafters that are models, for one generation."""
        with self.target_states.state() as target:
            if drafter not in WITH_DRAFT_STATE or self.draft_states is None:
                yield target, None
                return
            with self.draft_states.state() as draft:
                yield target, draft

    def _start(self, prompt: Prompt, options: dict[str, Any]) -> Events:
        """Check everything up front (so errors surface at the call, even for `stream`), then return the
        generation, a generator that has not started."""
        config = GenerationConfig.from_options(options)
        prompt_ids = self._prompt_ids(prompt)
        self._check_lengths(prompt_ids, config.max_new_tokens)
        drafter = self._drafter(config)
        # γ's policy now, not inside the timed generation: auto may have to calibrate first
        draft_length = self._draft_length(config, drafter) if drafter != "none" else None
        chooser = TokenChooser(_sampling(config), np.random.default_rng(config.seed))
        return self._generate(prompt_ids, config, chooser, drafter, draft_length)

    def _generate(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        chooser: TokenChooser,
        drafter: str,
        draft_length: DraftLength | AutoDraftLength | HybridLength | None,
    ) -> Events:
        """Yield (text delta, None) as tokens are committed, then ("", the result). Decodes in states of
        its own, taken when it starts and handed back when it ends, is closed or is collected."""
        loop = LoopStats()
        text = TextAssembler(self.tokenizer.stream(), config.stop)
        ids: list[int] = []
        with self._states(drafter) as (target, draft):
            start = time.perf_counter()
            first_token_at = None
            proposer = self._proposer(config, drafter, target, draft, draft_length)
            rounds = speculative_decode(
                target,
                prompt_ids,
                config.max_new_tokens,
                self.eos_token_ids,
                chooser,
                proposer,
                draft_length,
                loop,
            )
            for chunk in rounds:
                first_token_at = first_token_at or time.perf_counter()
                for token in chunk:
                    ids.append(token)
                    if text.push(token):
                        loop.finish_reason = "stop"
                        break
                if loop.finish_reason == "stop":
                    rounds.close()
                    break
                if delta := text.delta():
                    yield delta, None
            if proposer is not None:
                proposer.learn(prompt_ids, ids)
        text.finish()
        if delta := text.delta(final=True):
            yield delta, None
        seconds = time.perf_counter() - start
        verify_calls = loop.target_calls - 1
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            new_tokens=len(ids),
            target_calls=loop.target_calls,
            draft_calls=proposer.calls if proposer is not None else 0,
            drafted_tokens=loop.drafted,
            accepted_tokens=loop.accepted,
            acceptance_rate=loop.accepted / loop.drafted if loop.drafted else None,
            tokens_per_target_call=(len(ids) - 1) / verify_calls if verify_calls else float(len(ids)),
            seconds=seconds,
            time_to_first_token=(first_token_at or start) - start,
            tokens_per_second=len(ids) / seconds if seconds > 0 else 0.0,
            draft_tokens=config.draft_tokens if proposer else 0,
            drafter=drafter,
            accepted_per_round=tuple(loop.accepted_per_round),
            drafted_per_round=tuple(loop.drafted_per_round),
            undrafted_rounds=loop.undrafted_rounds,
            finish_reason=loop.finish_reason,
        )
        yield "", GenerationResult(text.text, ids, stats)

    def generate(self, prompt: Prompt, **options: Any) -> GenerationResult:
        """Generate a continuation of `prompt` (text, encoded with the tokenizer's special tokens, or
        token ids used as-is). Greedy unless `temperature` > 0; with a draft (the package's draft
        model, or draft="suffix" or "ngram") decoding is speculative and lossless: greedy output equals the
        target's own, sampled output follows exactly the target's distribution. Options: see
        `GenerationConfig` (max_new_tokens, use_draft, draft_tokens, temperature, top_k, top_p,
        min_p, repetition_penalty, seed, stop, ...).
        """
        events = self._start(prompt, options)
        try:
            for _, result in events:
                if result is not None:
                    return result
        finally:
            events.close()
        raise AssertionError("generation ended without a result")

    def stream(self, prompt: Prompt, **options: Any) -> TextStream:
        """Like `generate`, but yields text deltas as tokens are committed; see `TextStream.result`."""
        return TextStream(self._start(prompt, options))

    def chat_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template (as transformers renders it)."""
        text = render_chat(
            self.manifest.tokenizer.chat_template, messages, self.tokenizer.special_tokens, add_generation_prompt
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: Sequence[Message], **options: Any) -> GenerationResult:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts)."""
        return self.generate(self.chat_prompt(messages), **options)

    def chat_stream(self, messages: Sequence[Message], **options: Any) -> TextStream:
        """Like `chat`, streaming text deltas."""
        return self.stream(self.chat_prompt(messages), **options)


def _sampling(config: GenerationConfig) -> SamplingConfig:
    return SamplingConfig(
        config.temperature, config.top_k, config.top_p, config.min_p, config.repetition_penalty, config.seed
    )


def _reproducible(config: GenerationConfig) -> bool:
    """Seeded sampling: drafting must not depend on timings or earlier generations, which change the samples."""
    return config.seed is not None and config.temperature > 0


def load(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    draft_providers: Sequence[str] | None = None,
    threads: int | None = None,
    draft_threads: int | None = None,
    max_length: int | None = None,
    verify: bool = True,
    idle_states: int = DEFAULT_IDLE_STATES,
    cuda_graphs: bool = True,
    batch: int = 0,
) -> Pipeline:
    """Open a deployment package written by `ortspec export`.

    `providers` are ONNX Runtime execution providers in priority order (default: CPU);
    `draft_providers` (default: the same) lets the draft run elsewhere; `threads` sets the target's
    intra-op threads (default: ORT's, one per physical core); `draft_threads` the draft's (default
    1: a draft small enough to pay is faster on one thread than synchronising a pool, and leaves the
    other cores' pool threads to the target; the draft's pool never spins); `max_length` caps prompt +
    new tokens (default: the model's maximum, at most 4096; the shared KV buffers are allocated for
    it); `verify=False` skips the sha256 check (sizes are always checked). Each generation running at
    once has KV buffers of its own; `idle_states` bounds how many of them per model are kept for
    reuse when no generation holds them. `cuda_graphs` (CUDA provider only) replays decoding's small calls
    as CUDA graphs, which removes most of a small model's per-call launch cost on a GPU. `batch` > 1
    turns on continuous batching for that many generations at once (see `BatchedModel`), where the
    target graph allows it (`batch_problem`: builder graphs of this ortspec on the CPU); elsewhere
    generations decode one call each, as without.
    """
    manifest = load_manifest(path, verify=verify)
    root = manifest.root
    head = manifest.draft is not None and manifest.draft.is_head
    target = Model.load(
        manifest.target, root, providers, threads, max_length, keep_hidden=head, cuda_graphs=cuda_graphs
    )
    draft = None
    if manifest.draft is not None:
        draft_threads = draft_threads or DEFAULT_DRAFT_THREADS
        draft_providers = draft_providers or providers
        draft = Model.load(
            manifest.draft,
            root,
            draft_providers,
            draft_threads,
            max_length,
            spinning=False,
            keep_hidden=head,
            cuda_graphs=cuda_graphs,
        )
    key = calibration_key_for(target.providers, threads, draft_threads, draft.providers if draft is not None else None)
    tokenizer = TextTokenizer(
        manifest.tokenizer_file(TOKENIZER_FILE), manifest.tokenizer_file(TOKENIZER_CONFIG_FILE)
    )  # the files load_manifest checked, no others
    rows = BatchedModel(target, batch) if batch > 1 and batch_problem(target) is None else None
    return Pipeline(manifest, target, draft, tokenizer, key, idle_states, rows)
