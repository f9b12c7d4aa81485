"""One ONNX causal LM: a shared, immutable `Model` (session and graph facts), and per sequence a
`DecoderState` (KV cache, IO binding, position) that feeds tokens and returns their logits.
Knows nothing of speculation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnxruntime as ort

from . import graph_names as names
from .cuda_graphs import GraphedCalls, no_graph_run_options
from .kv_cache import CacheStateError, ConcatKVCache, KVCache, SharedBufferKVCache
from .manifest import ModelSpec, PackageError, resolve_inside
from .session import create_session, output_device

ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DEFAULT_MAX_LENGTH = 4096  # positions held per sequence unless the caller asks for more (or less)


class ContextLengthError(ValueError):
    """A sequence would grow past what the model (or its cache) can hold."""


def check_graph(spec: ModelSpec, session: ort.InferenceSession) -> str:
    """Refuse a graph whose inputs, outputs or shapes disagree with its manifest entry, naming the field;
    return its KV layout, read from its inputs."""
    role = spec.role
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}

    def refuse(problem: str) -> NoReturn:
        raise PackageError(f"the {role} graph {spec.onnx} {problem}; the package is inconsistent, re-export it")

    for field, listed, actual in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        if unlisted := [name for name in actual if name not in listed]:
            refuse(f"has {field} {', '.join(unlisted)} that {role}.{field} does not list")
        if absent := [name for name in listed if name not in actual]:
            refuse(f"lacks {field} {', '.join(absent)} that {role}.{field} lists")
    if names.INPUT_IDS not in inputs or names.LOGITS not in outputs:
        refuse(f"has no {names.INPUT_IDS} input or no {names.LOGITS} output")
    layers = names.count_layers(inputs)
    if layers != spec.num_layers:
        refuse(f"has a cache of {layers} layers, {role}.num_layers says {spec.num_layers}")
    layout = names.kv_layout(inputs)
    if layout != spec.kv_layout:
        refuse(f"has the {layout} KV layout, {role}.kv_layout says {spec.kv_layout}")
    if layout == names.SHARED_BUFFER and names.TOTAL_SEQUENCE_LENGTH not in inputs:
        refuse(f"has no {names.TOTAL_SEQUENCE_LENGTH} input")
    cache = [(n, inputs.get(n)) for n in names.past_names(layers)]
    cache += [(n, outputs.get(n)) for n in names.present_names(layers)]
    for name, value in cache:
        if value is None:
            refuse(f"lacks cache tensor {name}")
        if value.type != cache[0][1].type or value.type not in ONNX_TO_NUMPY:
            refuse(f"has cache tensor {name} of type {value.type}")
        shape = value.shape
        if len(shape) != 4:
            refuse(f"has cache tensor {name} of shape {shape}, not [batch, kv_heads, positions, head_dim]")
        if shape[1] != spec.num_kv_heads:
            refuse(f"has {shape[1]} KV heads in {name}, {role}.num_kv_heads says {spec.num_kv_heads}")
        if shape[3] != spec.head_dim:
            refuse(f"has a head dim of {shape[3]} in {name}, {role}.head_dim says {spec.head_dim}")
    logits = outputs[names.LOGITS]
    if not logits.shape or logits.shape[-1] != spec.vocab_size:
        refuse(f"has logits of shape {logits.shape}, {role}.vocab_size says {spec.vocab_size}")
    if logits.type not in ONNX_TO_NUMPY or np.dtype(ONNX_TO_NUMPY[logits.type]).name != spec.dtype:
        refuse(f"has logits of type {logits.type}, {role}.dtype says {spec.dtype}")
    return layout


class Model:
    """One ONNX causal LM, loaded once: its manifest entry, session and graph facts. Immutable, so one
    `Model` serves any number of sequences at once (ORT's `InferenceSession.run*` is thread-safe);
    each sequence decodes in a `DecoderState` of its own, from `new_state()`.

    With `keep_hidden`, states also keep the graph's `hidden_states` output (feature-level draft
    heads read the target's); a graph with a `features` input (a head) takes one feature row per token.
    """

    def __init__(
        self,
        spec: ModelSpec,
        session: ort.InferenceSession,
        max_length: int | None = None,
        keep_hidden: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.spec = spec
        self.session = session
        self.max_length = min(spec.max_positions, max_length or DEFAULT_MAX_LENGTH)
        self.layout = check_graph(spec, session)
        inputs = {i.name: i for i in session.get_inputs()}
        self.cache_dtype = ONNX_TO_NUMPY[inputs[names.past_names(spec.num_layers)[0]].type]
        self.device = output_device(session)
        self.providers: list[str] = session.get_providers()
        self.wants_mask = names.ATTENTION_MASK in inputs
        self.wants_positions = names.POSITION_IDS in inputs
        self.ones = np.ones((1, self.max_length), dtype=np.int64)  # read-only slices feed every state
        self.positions = np.arange(self.max_length, dtype=np.int64)[None, :]
        self.scores_tail = names.LOGITS_TO_KEEP in inputs  # can score only the last positions (prompts)
        features = inputs.get(names.FEATURES)
        self.feature_size = int(features.shape[-1]) if features is not None else 0
        self.feature_dtype = ONNX_TO_NUMPY[features.type] if features is not None else np.float32
        self.keep_hidden = keep_hidden
        outputs = {o.name: o for o in session.get_outputs()}
        has_hidden = names.HIDDEN_STATES in outputs
        self.logits_dtype = ONNX_TO_NUMPY[outputs[names.LOGITS].type]
        self.hidden_size = int(outputs[names.HIDDEN_STATES].shape[-1]) if has_hidden else 0
        # CUDA graphs (cuda_graphs.py) need a session created for them, fixed buffers and a graph that
        # does not change with the sequence length; every other call then runs with capture off.
        self.cuda_graphs = (
            cuda_graphs
            and self.device == "cuda"
            and self.layout == names.SHARED_BUFFER
            and spec.long_rope_after is None
        )
        self.run_options = no_graph_run_options() if cuda_graphs else None
        # A graph is captured from the session's stream: a call from another thread meanwhile would land
        # in it. The GPU runs one call at a time anyway, so calls on a graph session take turns.
        self.run_lock: threading.Lock | contextlib.nullcontext = (
            threading.Lock() if cuda_graphs else contextlib.nullcontext()
        )
        if keep_hidden and (not has_hidden or self.layout != names.SHARED_BUFFER):
            raise ValueError(
                f"the {spec.role} graph has no hidden_states output: re-export it with this ortspec's builder"
            )

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        root: Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        max_length: int | None = None,
        spinning: bool = True,
        keep_hidden: bool = False,
        cuda_graphs: bool = True,
    ) -> Model:
        """Open the model of `spec` from the package directory `root` (see `session_options` for `spinning`).

        `spec` comes from `load_manifest`, which has checked the graph file and its external data.
        `cuda_graphs`: on the CUDA provider, replay small decoding calls as CUDA graphs where the graph allows.
        """
        path = resolve_inside(root, spec.onnx)
        graphs = (  # CUDA's GroupQueryAttention runs fp16/bf16 only: an fp32 graph has nodes on the CPU
            cuda_graphs
            and spec.kv_layout == names.SHARED_BUFFER
            and spec.long_rope_after is None
            and spec.dtype in ("float16", "bfloat16")
        )
        if graphs:
            try:
                return cls(
                    spec, create_session(path, providers, threads, spinning, True), max_length, keep_hidden, True
                )
            except Exception as exc:  # ORT refuses graph capture when a node runs on the CPU (e.g. fp32 attention)
                if "graph capture" not in str(exc):
                    raise
        return cls(spec, create_session(path, providers, threads, spinning), max_length, keep_hidden)

    @property
    def vocab_size(self) -> int:
        """Columns of the logits."""
        return self.spec.vocab_size

    def new_cache(self) -> KVCache:
        """Empty KV buffers for one sequence (a shared-buffer cache allocates `max_length` positions)."""
        spec = self.spec
        pasts, presents = names.past_names(spec.num_layers), names.present_names(spec.num_layers)
        if self.layout == names.SHARED_BUFFER:
            return SharedBufferKVCache(
                pasts, presents, spec.num_kv_heads, spec.head_dim, self.max_length, self.cache_dtype, self.device
            )
        return ConcatKVCache(pasts, presents, spec.num_kv_heads, spec.head_dim, self.cache_dtype, self.device)

    def new_state(self) -> DecoderState:
        """A fresh sequence on this model, with KV buffers of its own."""
        return DecoderState(self)


_LOGITS_TO_KEEP = {keep: np.array([keep], np.int64) for keep in (0, 1)}  # bound by reference: never freed


def bind_logits_to_keep(model: Model, binding: ort.IOBinding, keep: int) -> None:
    """Bind how many trailing positions the call scores (0: all), where the graph takes it."""
    if model.scores_tail:
        binding.bind_cpu_input(names.LOGITS_TO_KEEP, _LOGITS_TO_KEEP[keep])


class DecoderState:
    """One sequence on a `Model`: its KV cache, IO binding, cached token ids and (with `keep_hidden`)
    latest hidden states. `forward(tokens)` returns logits for those tokens. Not thread-safe: one
    generation at a time uses a state; many states share one model.

    Longrope models (`spec.long_rope_after`) rotate with other factors once the sequence is longer
    than the switch point, and transformers' Phi-3 then recomputes the cached keys: so does
    `forward`, whenever the cache holds the other table's keys (after growing past the switch,
    or after rolling back below it). Each row of logits is then the one the sequence up to it gets.
    """

    def __init__(self, model: Model, cache: KVCache | None = None) -> None:
        self.model = model
        self.cache = cache if cache is not None else model.new_cache()
        self._binding = self._new_binding()
        self.hidden = np.zeros((0, 0), np.float32)
        self.hidden_start = 0
        self._tokens: list[int] = []  # the cached sequence (longrope recomputes it; `check` compares it)
        self._long = False  # whether the cache holds longrope's long-factor keys
        self._one_token = np.zeros((1, 1), np.int64)  # a one-token call's input_ids, bound once, written in place
        self._graphs = GraphedCalls(model, self.cache) if model.cuda_graphs else None

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

    def forward(
        self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False
    ) -> np.ndarray:
        """Run the new tokens on top of the cache; return float32 logits [len(token_ids), vocab].

        `last_only`: only the last position's logits are wanted (a prompt): graphs that can score only the
        last positions then return that one row, others all rows; read them with [-1].
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
            return self._run(token_ids, features, last_only)
        short = max(0, min(n, switch - past))  # the new positions whose sequence still fits the short table
        parts = [(list(token_ids[:short]), False), (list(token_ids[short:]), True)]
        return np.concatenate([self._run_rotated(tokens, long, last_only) for tokens, long in parts if tokens])

    def _run_rotated(self, token_ids: list[int], long: bool, last_only: bool = False) -> np.ndarray:
        """`_run` with the cache's keys from the `long` (or short) table, recomputing them if need be."""
        if self._long == long or self.cache.length == 0:
            self._long = long
            return self._run(token_ids, last_only=last_only)
        history = self._tokens[: self.cache.length]
        self.cache.reset()
        self._long = long
        logits = self._run(history + token_ids, last_only=last_only)
        return logits[-1:] if last_only else logits[len(history) :]

    def _run(self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        n = len(token_ids)
        past = self.cache.length
        model = self.model
        if self._graphs is not None and self._graphs.accepts(n, past):
            logits, hidden = self._graphs.run(token_ids, past, features)
            self.cache.update((), n)
            self._tokens[past:] = token_ids
            if hidden is not None:
                self.hidden, self.hidden_start = np.array(hidden), past
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
            self.hidden = np.array(outputs[len(outputs) - 1].numpy()[0])
            self.hidden_start = past
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
        """Start a new sequence, letting go of what the last call left behind: its outputs stay in the
        binding (a prefill's logits: positions x vocabulary floats) and, with concat caches, its pasts."""
        self.cache.reset()
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
