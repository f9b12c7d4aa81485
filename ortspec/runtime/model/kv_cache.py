"""The KV cache of one model, kept as OrtValues between calls and bound with IO binding.

Speculation needs one thing beyond plain decoding: rolling the cache back to the accepted prefix.
Every layout offers the same small interface (`length`, `bind`, `update`, `truncate`, `reset`) so the
decoder and the speculative loop never care how the cache is stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from ortspec.runtime.errors import CacheStateError
from ortspec.runtime.package.graph_names import SEQLENS_K, TOTAL_SEQUENCE_LENGTH


class KVCache(ABC):
    """KV state of one decoder: how many positions it holds, and how to bind it for the next call."""

    def __init__(self, past_names: Sequence[str], present_names: Sequence[str]) -> None:
        if len(past_names) != len(present_names):
            raise ValueError("past and present name lists differ in length")
        self._past_names = list(past_names)
        self._present_names = list(present_names)
        self._length = 0

    @property
    def length(self) -> int:
        """Number of positions currently cached."""
        return self._length

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected drafts)."""
        if not 0 <= length <= self._length:
            raise CacheStateError(
                f"internal error: cannot truncate a cache of {self._length} positions to {length}; "
                "this is a bug in ortspec, please report it"
            )
        if length != self._length:
            self._drop_after(length)
            self._length = length

    @abstractmethod
    def _drop_after(self, length: int) -> None:
        """Layout-specific part of `truncate`, called with the new, shorter length."""

    def bind_once(self, binding: ort.IOBinding) -> None:  # noqa: B027 - most layouts have none
        """Bindings that never change between calls (done once per session binding)."""

    @abstractmethod
    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        """Bind what changes for a call that adds `new_tokens` positions."""

    @abstractmethod
    def update(self, outputs: Sequence[Any], new_tokens: int) -> None:
        """Take the call's outputs (logits first, then the presents in their names' order) as the new state."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache for a new sequence."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory the cache holds."""


class ConcatKVCache(KVCache):
    """Cache of graphs whose `present` = concat(`past`, new): presents become the next pasts.

    The presents of one call are bound as the pasts of the next as OrtValues, on the session's
    device, with no numpy round trip. Truncation slices to the accepted length: one copy.
    """

    def __init__(
        self,
        past_names: Sequence[str],
        present_names: Sequence[str],
        num_kv_heads: int,
        head_dim: int,
        dtype: type[np.floating[Any]],
        device: str = "cpu",
    ) -> None:
        super().__init__(past_names, present_names)
        self._shape = (1, num_kv_heads, 0, head_dim)
        self._dtype = np.dtype(dtype)
        self._device = device
        self._values: list[ort.OrtValue] = []
        self.reset()

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, 0)

    def reset(self) -> None:
        empty = np.zeros(self._shape, dtype=self._dtype)
        self._values = [self._to_device(empty) for _ in self._past_names]
        self._length = 0

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        for name, value in zip(self._past_names, self._values, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self._present_names:
            binding.bind_output(name, self._device)

    def update(self, outputs: Sequence[Any], new_tokens: int) -> None:
        self._values = [ort.OrtValue(outputs[i]) for i in range(1, len(outputs))]
        self._length += new_tokens

    def _drop_after(self, length: int) -> None:
        self._values = [self._to_device(value.numpy()[:, :, :length]) for value in self._values]

    def nbytes(self) -> int:
        per_position = self._shape[1] * self._shape[3] * self._dtype.itemsize
        return len(self._values) * self._length * per_position


class SharedBufferKVCache(KVCache):
    """Cache of GroupQueryAttention graphs: one preallocated [1, kv_heads, max_length, head_dim] buffer
    per layer and K/V, bound as both past and present.

    GroupQueryAttention writes the new entries in place at the positions given by `seqlens_k`, so a
    step copies nothing and `truncate` only moves the length back: rejected entries are simply
    overwritten by the next call.
    """

    def __init__(
        self,
        past_names: Sequence[str],
        present_names: Sequence[str],
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: type[np.floating[Any]],
        device: str = "cpu",
        buffers: list[ort.OrtValue] | None = None,
    ) -> None:
        super().__init__(past_names, present_names)
        shape = [1, num_kv_heads, max_length, head_dim]
        if buffers is not None:  # one row of a batch's buffers (runtime/batching.py)
            self.buffers = buffers
        elif device == "cpu":
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _ in past_names]
        else:
            self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0) for _ in past_names]
        self.max_length = max_length
        self._nbytes = len(past_names) * int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._seqlens_k = np.zeros(1, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)

    def reset(self) -> None:
        self._length = 0

    def nbytes(self) -> int:
        return self._nbytes  # allocated for max_length positions, whatever it holds

    def bind_once(self, binding: ort.IOBinding) -> None:
        # The buffers never move, so they are bound once; per call only the lengths change.
        for past, present, buffer in zip(self._past_names, self._present_names, self.buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        total = self._length + new_tokens
        self._seqlens_k[0] = total - 1
        self._total[...] = total
        binding.bind_cpu_input(SEQLENS_K, self._seqlens_k)
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, self._total)

    def update(self, outputs: Sequence[Any], new_tokens: int) -> None:
        self._length += new_tokens

    def _drop_after(self, length: int) -> None:
        """Nothing to copy: the next call overwrites the stale entries in place."""
