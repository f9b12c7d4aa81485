"""Idle decoder states of one model, kept for the next generation instead of allocated afresh, and
with them the sequence their cache holds: a prefix cache.

A state's shared KV buffer holds `max_length` positions (about 190 MB for 4096 positions of a 135M
model), so generations reuse them; the pool keeps at most `size` idle ones (and, with `max_bytes`, at
most that many bytes of them), dropping the least recently used, whose buffers are freed with them.
An idle state still holds its last sequence: a generation takes the one holding the longest prefix of
its prompt and feeds only the rest (as llama.cpp's server picks a slot by its cached prompt, and vLLM
keeps freed KV blocks for their prefixes until evicted, least recently used first). With a
`BatchedModel`, generations get its rows first (their steps share calls; a released row keeps its
sequence the same way) and states of their own only when every row is taken.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ortspec.runtime.model.batching import BatchedModel, RowState
from ortspec.runtime.model.decoder import DecoderState, best_reuse
from ortspec.runtime.model.onnx_model import Model

DEFAULT_IDLE_STATES = 4


class StatePool:
    """Hands out states of `model`, one per generation, and takes them back when it ends. Thread-safe.

    `reuse=False` turns the prefix cache off: every state is handed out empty.
    """

    def __init__(
        self,
        model: Model,
        size: int = DEFAULT_IDLE_STATES,
        batch: BatchedModel | None = None,
        max_bytes: int | None = None,
        reuse: bool = True,
    ) -> None:
        if size < 0:
            raise ValueError(f"the number of idle states kept must be at least 0, got {size}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the bytes of idle states kept must be at least 0, got {max_bytes}")
        self.model = model
        self.batch = batch
        self.size = size
        self.max_bytes = max_bytes
        self.reuse = reuse
        self.created = 0  # states made so far (reuse keeps this at the peak of concurrent generations)
        self._idle: list[DecoderState] = []  # least recently used first
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def idle_bytes(self) -> int:
        """Bytes the idle states hold."""
        with self._lock:
            return sum(state.nbytes() for state in self._idle)

    def take(self, prompt: Sequence[int] | None = None) -> DecoderState:
        """A free row of the batch, an idle state, or a new one. For a `prompt` (with reuse on): the one
        holding the longest prefix of it, as it is (`DecoderState.reuse` keeps that prefix), else the least
        recently used; without one, emptied."""
        wanted = prompt if self.reuse else None
        state: DecoderState | None = self.batch.take(wanted) if self.batch is not None else None
        if state is None:
            with self._lock:
                if not self._idle:
                    self.created += 1
                    return DecoderState(self.model)
                best = best_reuse(self._idle, wanted) if wanted is not None else None
                state = self._idle.pop(best or 0)
        if wanted is None:
            state.reset()
        return state

    def give(self, state: DecoderState) -> None:
        """Take `state` back, holding its sequence; beyond `size` idle states (or `max_bytes`) the least
        recently used is dropped and its buffers freed."""
        if isinstance(state, RowState):
            state.shed()
            state.batch.release(state)
            return
        if self.reuse:
            state.shed()
        else:
            state.reset()
        with self._lock:
            self._idle.append(state)
            while self._idle and (len(self._idle) > self.size or self._over_bytes()):
                del self._idle[0]

    def _over_bytes(self) -> bool:
        return self.max_bytes is not None and sum(state.nbytes() for state in self._idle) > self.max_bytes

    @contextmanager
    def state(self, prompt: Sequence[int] | None = None) -> Iterator[DecoderState]:
        """A state for the duration of a `with` block (see `take`)."""
        state = self.take(prompt)
        try:
            yield state
        finally:
            self.give(state)
