"""CUDA graphs for the small calls of decoding: one captured graph per (state, number of new tokens).

A small model's step on a GPU is bound by the host launching a few hundred kernels, not by the GPU
(SmolLM2-135M: ~3.4 ms per step on an H200, whatever the number of new positions). ONNX Runtime can
capture a call's kernels once as a CUDA graph and replay them with one launch, if every input and
output stays at the same device address and shape. Decoding fits: the shared KV buffers never move
and GroupQueryAttention reads each call's position from `seqlens_k` on the device. So each state
keeps, per call size n = 1..MAX_GRAPH_TOKENS, device buffers for the token ids, `seqlens_k`, the
logits (and features), updated in place before each call; ORT captures the graph on the third call
of that size (`gpu_graph_id` names it) and replays it afterwards.

Not graphed: calls on an empty cache (GroupQueryAttention takes its first-prompt path there), calls
of more tokens (prompts), and every call of a model whose graph changes with the sequence length
(longrope's table switch). Those run as before, with graph capture off for the run (`gpu_graph_id`
-1: the default id would capture them).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from ortspec.runtime.model.onnx_model import Model, bind_logits_to_keep
from ortspec.runtime.model.session import GRAPH_ID
from ortspec.runtime.package import graph_names as names

if TYPE_CHECKING:
    from ortspec.runtime.model.kv_cache import SharedBufferKVCache

MAX_GRAPH_TOKENS = 16
_graph_ids = itertools.count(1)  # ids are per session; unique in the process is simpler and enough


class GraphSlot:
    """The fixed device buffers and IO binding of one call size of one state."""

    def __init__(self, model: Model, cache: SharedBufferKVCache, tokens: int) -> None:
        def device(shape: list[int], dtype: type) -> ort.OrtValue:  # on the model's device (tests: the CPU)
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, model.device, 0)

        self.input_ids = device([1, tokens], np.int64)
        self.seqlens_k = device([1], np.int32)
        # total_sequence_length is a host input, frozen into the captured graph: with a shared buffer the
        # attention reads each row's length from seqlens_k, so the buffer's length serves every call.
        self.total = np.array(cache.max_length, np.int32)
        self.logits = device([1, tokens, model.vocab_size], model.logits_dtype)
        self.binding = model.session.io_binding()
        self.binding.bind_ortvalue_input(names.INPUT_IDS, self.input_ids)
        self.binding.bind_ortvalue_input(names.SEQLENS_K, self.seqlens_k)
        self.binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, self.total)
        bind_logits_to_keep(model, self.binding, 0)  # a host input too, frozen: graphed calls score every position
        cache.bind_once(self.binding)
        self.binding.bind_ortvalue_output(names.LOGITS, self.logits)
        self.hidden = self.features = None
        if model.keep_hidden:
            self.hidden = device([1, tokens, model.hidden_size], model.logits_dtype)
            self.binding.bind_ortvalue_output(names.HIDDEN_STATES, self.hidden)
        if model.feature_size:
            self.features = device([1, tokens, model.feature_size], model.feature_dtype)
            self.binding.bind_ortvalue_input(names.FEATURES, self.features)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry(GRAPH_ID, str(next(_graph_ids)))


class GraphedCalls:
    """CUDA-graph replays of one state's calls of 1..MAX_GRAPH_TOKENS new tokens on a non-empty cache."""

    def __init__(self, model: Model, cache: SharedBufferKVCache) -> None:
        self.model, self.cache = model, cache
        self._slots: dict[int, GraphSlot] = {}

    def accepts(self, tokens: int, past: int) -> bool:
        return past > 0 and tokens <= MAX_GRAPH_TOKENS

    def run(
        self, token_ids: Sequence[int], past: int, features: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 logits [n, vocab], hidden [n, hidden] or None) of the new tokens; the cache grows by n."""
        n = len(token_ids)
        if features is None and self.model.feature_size:
            features = np.zeros((n, self.model.feature_size), self.model.feature_dtype)
        with self.model.run_lock:  # copies to and from the device too: none may land in another state's capture
            slot = self._slots.get(n)
            if slot is None:
                slot = self._slots[n] = GraphSlot(self.model, self.cache, n)
            slot.input_ids.update_inplace(np.asarray(token_ids, np.int64).reshape(1, n))
            slot.seqlens_k.update_inplace(np.array([past + n - 1], np.int32))
            if slot.features is not None:
                slot.features.update_inplace(np.ascontiguousarray(features, self.model.feature_dtype).reshape(1, n, -1))
            self.model.session.run_with_iobinding(slot.binding, slot.run_options)
            hidden = slot.hidden.numpy()[0] if slot.hidden is not None else None
            logits = slot.logits.numpy()[0]
        return np.array(logits, np.float32), hidden  # a copy: the next call reuses the buffer
