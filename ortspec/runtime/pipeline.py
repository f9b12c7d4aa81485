"""The public runtime object: `ortspec.load(path)` -> `Pipeline.generate/stream/chat(...)`."""

from __future__ import annotations

import numbers
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ortspec.runtime.drafters.factory import new_proposer
from ortspec.runtime.drafters.hybrid import HybridLength
from ortspec.runtime.drafters.suffix import SuffixMemory
from ortspec.runtime.errors import ContextLengthError
from ortspec.runtime.model.batching import BatchedModel, batch_problem
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model
from ortspec.runtime.model.state_pool import DEFAULT_IDLE_STATES, StatePool
from ortspec.runtime.options import (
    DrafterKind,
    GenerationConfig,
    check_paths,
    check_text,
    check_threads,
    default_drafter,
)
from ortspec.runtime.package.manifest import TOKENIZER_CONFIG_FILE, Manifest, load_manifest
from ortspec.runtime.results import Events, GenerationResult, GenerationStats, TextStream
from ortspec.runtime.speculation.auto_length import AutoDraftLength, AutoMemo, AutoState
from ortspec.runtime.speculation.calibration import Calibration, measure
from ortspec.runtime.speculation.calibration import calibration_key as calibration_key_for
from ortspec.runtime.speculation.calibration_store import calibration_files, load_calibration, save_calibration
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.draft_length import DraftLength, DraftLengthPolicy
from ortspec.runtime.speculation.loop import LoopStats, speculative_decode
from ortspec.runtime.speculation.proposal import Proposer
from ortspec.runtime.speculation.sampling import SamplingConfig
from ortspec.runtime.text.chat import Message, render_chat
from ortspec.runtime.text.tokenizer import TextAssembler, TextTokenizer

Prompt = str | Sequence[int]
DEFAULT_DRAFT_THREADS = 1


class Pipeline:
    """A loaded deployment package: target, optional draft and tokenizer, ready to generate.

    Thread-safe: any number of threads may call `generate`, `stream` and `chat` on one pipeline at
    once. The models (`target`, `draft`: sessions and weights) are shared; each generation takes
    decoder states of its own (KV cache, position, drafter) from `target_states` / `draft_states`
    and returns them when it ends, and the pools keep up to `idle_states` of each for reuse. An idle
    target state keeps the sequence its cache holds: with `prefix_cache`, a generation whose prompt
    starts with one takes that state and feeds only the rest of its prompt (a chat's next turn, a
    shared system prompt); `GenerationStats.cached_tokens` says how many prompt tokens it reused. What
    generations learn from one another (auto γ's estimates, suffix drafting's memory) is shared
    under locks. For direct model calls, `DecoderState(pipe.target)` gives a sequence of your own.

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
        idle_bytes: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        self.manifest = manifest
        self.target = target
        self.draft = draft
        self.batch = batch
        self.target_states = StatePool(target, idle_states, batch, idle_bytes, prefix_cache)
        # a draft LM re-reads at most its window of a prompt, a head reads the target's features: empty states
        self.draft_states = StatePool(draft, idle_states, max_bytes=idle_bytes) if draft is not None else None
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
        self._auto: dict[tuple[str, str, int], tuple[Calibration, AutoMemo]] = {}  # its cached per-context choices
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

    def _draft_length(self, config: GenerationConfig, drafter: DrafterKind) -> DraftLengthPolicy:
        if drafter is DrafterKind.HYBRID:  # each of its drafters keeps a policy (and what auto γ learns) of its own
            model = self._model_drafter()
            suffix = self._one_length(config, DrafterKind.SUFFIX, drafter)
            return HybridLength(suffix, self._one_length(config, model, drafter))
        return self._one_length(config, drafter)

    def _model_drafter(self) -> DrafterKind:
        """What the package's draft model is: a head or a draft LM."""
        if self.draft is None:
            raise ValueError("the package has no draft model")
        return DrafterKind.HEAD if self.draft.spec.is_head else DrafterKind.MODEL

    def _one_length(
        self, config: GenerationConfig, drafter: DrafterKind, within: str | None = None
    ) -> DraftLength | AutoDraftLength:
        """γ's policy for one drafter; `within` names the hybrid it serves, or "custom" for a caller's proposer
        (what it learns is kept apart)."""
        if config.draft_tokens == "adaptive":
            return DraftLength(None, config.draft_tokens_max)
        if config.draft_tokens == "auto":
            calibration = self.calibration(max_gamma=config.draft_tokens_max)
            draft_cost, max_gamma, scored = drafter.calls_a_model, config.draft_tokens_max, drafter.scores_tokens
            if _reproducible(config):
                # γ choices that depend on neither timings nor earlier generations (the samples depend
                # on them), only on the stored calibration and this generation's acceptance.
                return AutoDraftLength(
                    calibration, AutoState(), draft_cost, max_gamma, learn_timings=False, scored=scored
                )
            key = (str(within or ""), str(drafter), config.draft_tokens_max)
            with self._lock:
                memo = self._auto.get(key)
                if memo is None or memo[0] is not calibration:  # reuse the cached per-context costs
                    memo = self._auto[key] = (calibration, AutoMemo())
                state = self._auto_states.setdefault(f"{within or ''}:{drafter}", AutoState())
            batch = self.batch  # a plain round costs what a row adds to the batch's step; drafting fades as it fills
            load = (lambda: batch.in_use) if batch is not None else None
            return AutoDraftLength(calibration, state, draft_cost, max_gamma, scored=scored, memo=memo[1], load=load)
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
            if not 0 <= int(token) < self.target.vocab_size:
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

    def drafter(self, config: GenerationConfig) -> DrafterKind:
        """Which drafter a generation under `config` uses (the package's draft model resolved to a head or LM)."""
        if not config.use_draft:
            return DrafterKind.NONE
        drafter = DrafterKind(config.draft) if config.draft else default_drafter(self.draft is not None)
        if drafter.needs_draft_state and self.draft is None:
            raise ValueError(
                f"the package has no draft model (draft={drafter.value!r} needs one): export one with --draft, "
                "or use draft='suffix' or 'ngram'"
            )
        return self._model_drafter() if drafter is DrafterKind.MODEL else drafter

    def _suffix_memory(self, config: GenerationConfig) -> SuffixMemory:
        """The pipeline's pool; seeded sampling drafts from this sequence alone: the same seed, the same text."""
        return SuffixMemory() if _reproducible(config) else self.suffix_memory

    @contextmanager
    def _states(
        self, drafter: DrafterKind, prompt_ids: Sequence[int]
    ) -> Iterator[tuple[DecoderState, DecoderState | None]]:
        """A target state (holding the longest cached prefix of the prompt), and a draft state for drafters
        that are models, for one generation."""
        with self.target_states.state(prompt_ids) as target:
            if not drafter.needs_draft_state or self.draft_states is None:
                yield target, None
                return
            with self.draft_states.state() as draft:
                yield target, draft

    def _start(self, prompt: Prompt, options: dict[str, Any], custom: Proposer | None = None) -> Events:
        """Check everything up front (so errors surface at the call, even for `stream`), then return the
        generation, a generator that has not started."""
        config = GenerationConfig.from_options(options)
        prompt_ids = self._prompt_ids(prompt)
        self._check_lengths(prompt_ids, config.max_new_tokens)
        drafter = self.drafter(config)
        # γ's policy now, not inside the timed generation: auto may have to calibrate first
        if custom is not None:
            if drafter is DrafterKind.NONE:
                raise ValueError("a proposer drafts for speculative decoding: it cannot run with use_draft=False")
            drafter = DrafterKind.NGRAM  # the policy of a free drafter that does not score its tokens
            draft_length: DraftLengthPolicy | None = self._one_length(config, drafter, "custom")
        else:
            draft_length = self._draft_length(config, drafter) if drafter is not DrafterKind.NONE else None
        chooser = TokenChooser(_sampling(config), np.random.default_rng(config.seed))
        return self._generate(prompt_ids, config, chooser, drafter, draft_length, custom)

    def _generate(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        chooser: TokenChooser,
        drafter: DrafterKind,
        draft_length: DraftLengthPolicy | None,
        custom: Proposer | None = None,
    ) -> Events:
        """Yield (text delta, None) as tokens are committed, then ("", the result). Decodes in states of
        its own, taken when it starts and handed back when it ends, is closed or is collected."""
        loop = LoopStats()
        text = TextAssembler(self.tokenizer.stream(), config.stop)
        ids: list[int] = []
        with self._states(drafter, prompt_ids) as (target, draft):
            start = time.perf_counter()
            first_token_at = None
            memory = self._suffix_memory(config)
            proposer = custom
            if proposer is None:
                proposer = new_proposer(drafter, config, target, draft, draft_length, memory, self._shared_vocab)
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
            drafter="custom" if custom is not None else drafter.value,
            accepted_per_round=tuple(loop.accepted_per_round),
            drafted_per_round=tuple(loop.drafted_per_round),
            undrafted_rounds=loop.undrafted_rounds,
            finish_reason=loop.finish_reason,
            cached_tokens=loop.cached_tokens,
        )
        yield "", GenerationResult(text.text, ids, stats)

    def generate(self, prompt: Prompt, *, proposer: Proposer | None = None, **options: Any) -> GenerationResult:
        """Generate a continuation of `prompt` (text, encoded with the tokenizer's special tokens, or
        token ids used as-is). Greedy unless `temperature` > 0; with a draft (the package's draft
        model, or draft="suffix" or "ngram") decoding is speculative and lossless: greedy output equals the
        target's own, sampled output follows exactly the target's distribution. Options: see
        `GenerationConfig` (max_new_tokens, use_draft, draft_tokens, temperature, top_k, top_p,
        min_p, repetition_penalty, seed, stop, ...).

        `proposer` (for benchmarks and experiments) drafts in place of the package's drafters, as a free
        drafter under the γ policy `draft_tokens` names; what auto γ learns of it is kept apart. It is
        called once per round: see `Proposer`. The output is lossless whatever it proposes.
        """
        events = self._start(prompt, options, proposer)
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
    idle_bytes: int | None = None,
    prefix_cache: bool = True,
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
    reuse when no generation holds them, and `idle_bytes` (default: no bound but the count) how many
    bytes of them, the least recently used dropped first. `prefix_cache` (default on): a generation
    takes the idle state (or free batch row) whose cache holds the longest prefix of its prompt, and
    feeds only the rest; greedy output is the same (up to float rounding: near-ties). `cuda_graphs`
    (CUDA provider only) replays decoding's small calls as CUDA graphs, which removes most of a small
    model's per-call launch cost on a GPU. `batch` > 1
    turns on continuous batching for that many generations at once (see `BatchedModel`), where the
    target graph allows it (`batch_problem`: builder graphs of this ortspec on the CPU); elsewhere
    generations decode one call each, as without.
    """
    check_paths(path=path)
    check_threads("threads", threads)
    check_threads("draft_threads", draft_threads)
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
        manifest.tokenizer_json(), manifest.tokenizer_file(TOKENIZER_CONFIG_FILE)
    )  # the files load_manifest checked, no others
    rows = BatchedModel(target, batch) if batch > 1 and batch_problem(target) is None else None
    return Pipeline(manifest, target, draft, tokenizer, key, idle_states, rows, idle_bytes, prefix_cache)
