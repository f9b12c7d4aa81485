"""One sequence on an ONNX causal LM: a `DecoderState` (KV cache, IO binding, position) that feeds
tokens to a shared `Model` and returns their logits. Knows nothing of speculation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from ortspec.runtime.errors import CacheStateError, ContextLengthError
from ortspec.runtime.model.cuda_graphs import GraphedCalls
from ortspec.runtime.model.kv_cache import KVCache, SharedBufferKVCache
from ortspec.runtime.model.onnx_model import Model, bind_logits_to_keep
from ortspec.runtime.package import graph_names as names
from ortspec.runtime.package.manifest import ModelSpec

MIN_REUSE = 16  # prompt tokens an idle state must hold to be picked for them (a shorter match is left to chance)
# Longest call on the CPU provider: its GroupQueryAttention scores each new row against the whole sequence
# (the causal half masked, not skipped), so long prompts run faster as calls of this many tokens (500-token
# prefill, SmolLM2-135M int8 GEMM, 2 threads: 844 -> 1057 tokens/s; other sizes, 64-256, no faster; docs/design.md).
PREFILL_CHUNK = 128


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if len(differ) else n


def best_reuse(states: Sequence[DecoderState], prompt: Sequence[int], least: int = MIN_REUSE) -> int | None:
    """Index of the state that holds the longest prefix of `prompt` it can reuse (`DecoderState.reuse`), if
    that is at least `least` tokens; None if none does."""
    best, index = least - 1, None
    for i, state in enumerate(states):
        shared = shared_prefix(state.cached_tokens, prompt[:-1])
        if shared > best:
            best, index = shared, i
    return index


class DecoderState:
    """One sequence on a `Model`: its KV cache, IO binding, cached token ids and (with `keep_hidden`)
    hidden states. `forward(tokens)` returns logits for those tokens. Not thread-safe: one
    generation at a time uses a state; many states share one model.

    A state's cache is valid for the token ids it was fed (`cached_tokens`), whatever generation fed
    them: `reuse(prompt)` keeps the longest prefix of a new prompt it already holds (a prefix cache).

    Longrope models (`spec.long_rope_after`) rotate with other factors once the sequence is longer
    than the switch point, and transformers' Phi-3 then recomputes the cached keys: so does
    `forward`, whenever the cache holds the other table's keys (after growing past the switch,
    or after rolling back below it). Each row of logits is then the one the sequence up to it gets.
    """

    def __init__(self, model: Model, cache: KVCache | None = None) -> None:
        self.model = model
        self.cache = cache if cache is not None else model.new_cache()
        self._binding = self._new_binding()
        self.hidden = np.zeros((0, 0), np.float32)  # the latest call's hidden states, from position hidden_start
        self.hidden_start = 0
        # every cached position's hidden states (keep_hidden): a draft head reads those of a reused prefix too
        self._hidden_kept: np.ndarray | None = None
        self._tokens: list[int] = []  # the cached sequence (longrope recomputes it; `check` compares it)
        self._long = False  # whether the cache holds longrope's long-factor keys
        self._one_token = np.zeros((1, 1), np.int64)  # a one-token call's input_ids, bound once, written in place
        self._graphs: GraphedCalls | None = None
        if model.cuda_graphs and isinstance(self.cache, SharedBufferKVCache):  # a graphed model's caches all are
            self._graphs = GraphedCalls(model, self.cache)

    def _new_binding(self) -> ort.IOBinding:
        binding = self.model.session.io_binding()
        binding.bind_output(names.LOGITS, "cpu")  # first, so it stays the first output
        self.cache.bind_once(binding)
        bind_logits_to_keep(self.model, binding, 0)
        self._logits_to_keep = 0  # what the binding holds: rebound only when a call wants otherwise
        if self.model.keep_hidden:
            binding.bind_output(names.HIDDEN_STATES, "cpu")  # after logits and the cache buffers
        self._outputs_for: tuple[int, int] | None = None  # (positions, logits kept) its outputs were made for
        self._one_token_bound = False  # whether input_ids is bound to `_one_token`
        return binding

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def keep_hidden(self) -> bool:
        return self.model.keep_hidden

    @property
    def feature_size(self) -> int:
        return self.model.feature_size

    @property
    def length(self) -> int:
        """Positions currently in the cache."""
        return self.cache.length

    @property
    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values the cache holds, in order."""
        return self._tokens[: self.cache.length]

    def nbytes(self) -> int:
        """Bytes this state holds for its sequence (KV buffers, and kept hidden states)."""
        kept = self._hidden_kept.nbytes if self._hidden_kept is not None else 0
        return self.cache.nbytes() + kept

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix of `prompt` the cache holds, all of it but its last token at most (a
        prompt's last token is fed again for its logits), and forget the rest; return the positions kept."""
        kept = shared_prefix(self.cached_tokens, prompt[:-1])
        if kept == 0:
            self.reset()
        else:
            self.truncate(kept)
        return kept

    def hidden_at(self, start: int, end: int) -> np.ndarray:
        """Hidden states of cached positions [start, end) (a model kept with `keep_hidden`)."""
        if self._hidden_kept is None or not 0 <= start <= end <= self.cache.length:
            raise CacheStateError(
                f"internal error: no hidden states of positions [{start}, {end}) in a {self.spec.role} cache of "
                f"{self.cache.length}; this is a bug in ortspec, please report it"
            )
        return self._hidden_kept[start:end]

    def keep_hidden_states(self, hidden: np.ndarray, start: int) -> None:
        """Take a call's hidden states [positions, features], the first at position `start`."""
        self.hidden, self.hidden_start = hidden, start
        if self._hidden_kept is None:
            self._hidden_kept = np.zeros((self.max_length, hidden.shape[-1]), np.float32)
        self._hidden_kept[start : start + len(hidden)] = hidden

    def forward(
        self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False
    ) -> np.ndarray:
        """Run the new tokens on top of the cache; return float32 logits [len(token_ids), vocab].

        `last_only`: only the last position's logits are wanted (a prompt): graphs that can score only the
        last positions then return that one row, others several (the last chunk's); read them with [-1].
        """
        n = len(token_ids)
        past = self.cache.length
        if n == 0:
            raise ValueError("forward needs at least one token")
        if past + n > self.max_length:
            raise ContextLengthError(
                f"the {self.spec.role} model holds at most {self.max_length} positions; "
                f"{past} cached + {n} new would exceed it"
            )
        switch = self.spec.long_rope_after
        if switch is None:
            if n > PREFILL_CHUNK:
                return self._run_chunked(token_ids, features, last_only)
            return self._run(token_ids, features, last_only)
        short = max(0, min(n, switch - past))  # the new positions whose sequence still fits the short table
        parts = [(list(token_ids[:short]), False), (list(token_ids[short:]), True)]
        return np.concatenate([self._run_rotated(tokens, long, last_only) for tokens, long in parts if tokens])

    def _run_rotated(self, token_ids: list[int], long: bool, last_only: bool = False) -> np.ndarray:
        """`_run` with the cache's keys from the `long` (or short) table, recomputing them if need be."""
        if self._long == long or self.cache.length == 0:
            self._long = long
            return self._run_chunked(token_ids, last_only=last_only)
        history = self._tokens[: self.cache.length]
        self.cache.reset()
        self._long = long
        # a call takes the long table when its sequence ends past the switch: recomputing it is one call
        run = self._run if long else self._run_chunked
        logits = run(history + token_ids, last_only=last_only)
        return logits[-1:] if last_only else logits[len(history) :]

    def _run_chunked(
        self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False
    ) -> np.ndarray:
        """`_run` as consecutive calls of at most PREFILL_CHUNK tokens, all of near one size, on the CPU
        provider (others, not measured, get one call), returning what one call returns; `hidden` then
        holds all the positions."""
        n, start = len(token_ids), self.cache.length
        if n <= PREFILL_CHUNK or self.model.providers[0] != "CPUExecutionProvider":  # steps: no more work
            return self._run(token_ids, features, last_only)
        calls = -(-n // PREFILL_CHUNK)
        parts = []
        for i in range(calls):
            first, end = n * i // calls, n * (i + 1) // calls
            chunk = features[first:end] if features is not None else None
            logits = self._run(token_ids[first:end], chunk, last_only)
            if not last_only:
                parts.append(logits)
        if self.keep_hidden:
            self.hidden, self.hidden_start = self.hidden_at(start, start + n).copy(), start
        return logits if last_only else np.concatenate(parts)

    def _run(self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        n = len(token_ids)
        past = self.cache.length
        model = self.model
        if self._graphs is not None and self._graphs.accepts(n, past):
            logits, hidden = self._graphs.run(token_ids, past, features)
            self.cache.update((), n)
            self._tokens[past:] = token_ids
            if hidden is not None:
                self.keep_hidden_states(np.array(hidden), past)
            return logits
        binding = self._binding  # rebinding a name replaces it; unchanged bindings (cache buffers) stay
        self._bind_token_ids(token_ids)
        if model.wants_mask:
            binding.bind_cpu_input(names.ATTENTION_MASK, model.ones[:, : past + n])
        if model.wants_positions:
            binding.bind_cpu_input(names.POSITION_IDS, model.positions[:, past : past + n])
        keep = 1 if last_only and n > 1 else 0
        if (n, keep) != self._outputs_for:
            # A call of the previous one's shape writes into the outputs that one allocated (both are
            # copied out below); another shape needs them allocated afresh. Steady decoding then neither
            # rebinds nor allocates them (with the one-token input: plain decoding of SmolLM2-135M int4
            # chats 1.6% faster, same process, arms alternating).
            binding.bind_output(names.LOGITS, "cpu")
            if model.keep_hidden:
                binding.bind_output(names.HIDDEN_STATES, "cpu")
            self._outputs_for = (n, keep)
        if keep != self._logits_to_keep:  # one-token steps keep the binding as it is
            bind_logits_to_keep(model, binding, keep)
            self._logits_to_keep = keep
        if model.feature_size:
            if features is None:
                features = np.zeros((n, model.feature_size), model.feature_dtype)
            features = np.ascontiguousarray(features, model.feature_dtype).reshape(1, n, -1)
            binding.bind_cpu_input(names.FEATURES, features)
        self.cache.bind(binding, n)
        with model.run_lock:
            model.session.run_with_iobinding(binding, model.run_options)
        outputs = binding.get_outputs_as_ortvaluevector()  # no Python wrapper per output: cheaper per call
        self.cache.update(outputs, n)
        self._tokens[past:] = token_ids
        if model.keep_hidden:
            self.keep_hidden_states(np.array(outputs[len(outputs) - 1].numpy()[0]), past)
        return np.array(outputs[0].numpy()[0], dtype=np.float32)  # a copy: the binding reuses its buffer

    def _bind_token_ids(self, token_ids: Sequence[int]) -> None:
        """Bind the call's input_ids. One token goes through `_one_token`, bound once: ORT reads a bound CPU
        array where it lies, so writing the token in place is enough (decoding's steps skip the bind)."""
        if len(token_ids) == 1:
            self._one_token[0, 0] = token_ids[0]
            if not self._one_token_bound:
                self._binding.bind_cpu_input(names.INPUT_IDS, self._one_token)
                self._one_token_bound = True
            return
        self._binding.bind_cpu_input(names.INPUT_IDS, np.asarray(token_ids, dtype=np.int64)[None, :])
        self._one_token_bound = False

    def truncate(self, length: int) -> None:
        """Roll the cache back to its first `length` positions."""
        self.cache.truncate(length)

    def reset(self) -> None:
        """Start a new sequence, letting go of what the last call left behind (see `shed`) and, with concat
        caches, its pasts."""
        self.cache.reset()
        self.shed()

    def shed(self) -> None:
        """Let go of the last call's outputs, kept in the binding (a prefill's logits: positions x vocabulary
        floats), but not of the cache: an idle state keeps its sequence for `reuse`."""
        self._binding = self._new_binding()
        self.hidden = np.zeros((0, 0), np.float32)

    def check(self, sequence: Sequence[int], start: int, end: int) -> None:
        """Raise CacheStateError unless the cache holds `sequence[start:end]`: as many positions, ending in
        the same token (the last one only: a round's check costs O(1) however long the sequence)."""
        length = self.cache.length
        last = self._tokens[length - 1] if length else None
        expected = sequence[end - 1] if start < end <= len(sequence) else None
        if length != end - start or end > len(sequence) or last != expected:
            raise CacheStateError(
                f"internal error: the {self.spec.role} cache holds {length} positions ending in token {last}, "
                f"the decoding loop expects {end - start} ending in {expected}; this is a bug in ortspec, "
                "please report it"
            )
