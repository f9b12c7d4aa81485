"""One ONNX causal LM loaded once: its session and the facts of its graph, checked against the manifest.
Immutable and shared by every sequence decoding on it (`DecoderState`)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort

from ortspec.runtime.errors import PackageError
from ortspec.runtime.model.kv_cache import ConcatKVCache, KVCache, SharedBufferKVCache
from ortspec.runtime.model.session import create_session, no_graph_run_options, output_device
from ortspec.runtime.package import graph_names as names
from ortspec.runtime.package.manifest import ModelSpec, resolve_inside

ONNX_TO_NUMPY: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
DEFAULT_MAX_LENGTH = 4096  # positions held per sequence unless the caller asks for more (or less)


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
    cache_type = None  # the first cache tensor's: every other one must have it too
    for name, value in cache:
        if value is None:
            refuse(f"lacks cache tensor {name}")
        cache_type = cache_type or value.type
        if value.type != cache_type or value.type not in ONNX_TO_NUMPY:
            refuse(f"has cache tensor {name} of type {value.type}")
        if spec.kv_dtype is not None and np.dtype(ONNX_TO_NUMPY[value.type]).name != spec.kv_dtype:
            refuse(f"has cache tensor {name} of type {value.type}, {role}.kv_dtype says {spec.kv_dtype}")
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
    each sequence decodes in a `DecoderState` of its own (`DecoderState(model)`).

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
        self.run_lock: threading.Lock | contextlib.nullcontext[None] = (
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

    def cache_bytes(self) -> int:
        """Bytes of one sequence's KV buffers at `max_length` positions."""
        spec = self.spec
        per_layer = 2 * spec.num_kv_heads * self.max_length * spec.head_dim * np.dtype(self.cache_dtype).itemsize
        return spec.num_layers * per_layer

    def new_cache(self) -> KVCache:
        """Empty KV buffers for one sequence (a shared-buffer cache allocates `max_length` positions)."""
        spec = self.spec
        pasts, presents = names.past_names(spec.num_layers), names.present_names(spec.num_layers)
        if self.layout == names.SHARED_BUFFER:
            return SharedBufferKVCache(
                pasts, presents, spec.num_kv_heads, spec.head_dim, self.max_length, self.cache_dtype, self.device
            )
        return ConcatKVCache(pasts, presents, spec.num_kv_heads, spec.head_dim, self.cache_dtype, self.device)


def physical_memory() -> int | None:
    """Bytes of this machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_caches_fit(models: Sequence[Model], sequences: int, what: str) -> None:
    """Refuse `sequences` KV buffers of each of `models` beyond the machine's memory, naming `what` asked for
    them: an absurd count would end in a MemoryError, or in the OOM killer, long after it was given."""
    need = sequences * sum(model.cache_bytes() for model in models)
    memory = physical_memory()
    if memory is not None and need > memory:
        raise ValueError(
            f"{what} of {sequences} needs {need / 2**30:.1f} GiB of KV cache ({models[0].max_length} positions "
            f"each), more than this machine's {memory / 2**30:.1f} GiB: ask for fewer, or a shorter max_length"
        )


_LOGITS_TO_KEEP = {keep: np.array([keep], np.int64) for keep in (0, 1)}  # bound by reference: never freed


def bind_logits_to_keep(model: Model, binding: ort.IOBinding, keep: int) -> None:
    """Bind how many trailing positions the call scores (0: all), where the graph takes it."""
    if model.scores_tail:
        binding.bind_cpu_input(names.LOGITS_TO_KEEP, _LOGITS_TO_KEEP[keep])
