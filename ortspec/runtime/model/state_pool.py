"""Idle decoder states of one model, kept for the next generation instead of allocated afresh.

A state's shared KV buffer holds `max_length` positions (about 190 MB for 4096 positions of a 135M
model), so generations reuse them; the pool keeps at most `size` idle ones and drops the rest,
whose buffers are freed with them. With a `BatchedModel`, generations get its rows first (their steps
share calls) and states of their own only when every row is taken.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ortspec.runtime.model.batching import BatchedModel, RowState
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model

DEFAULT_IDLE_STATES = 4


class StatePool:
    """Hands out states of `model`, one per generation, and takes them back when it ends. Thread-safe."""

    def __init__(self, model: Model, size: int = DEFAULT_IDLE_STATES, batch: BatchedModel | None = None) -> None:
        if size < 0:
            raise ValueError(f"the number of idle states kept must be at least 0, got {size}")
        self.model = model
        self.batch = batch
        self.size = size
        self.created = 0  # states made so far (reuse keeps this at the peak of concurrent generations)
        self._idle: list[DecoderState] = []
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take(self) -> DecoderState:
        """A free row of the batch, an idle state, or a new one; empty either way."""
        if self.batch is not None and (row := self.batch.take()) is not None:
            return row
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return DecoderState(self.model)

    def give(self, state: DecoderState) -> None:
        """Take `state` back (emptied); beyond `size` idle states it is dropped and its buffers freed."""
        if isinstance(state, RowState):
            state.batch.release(state)
            return
        state.reset()
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(state)

    @contextmanager
    def state(self) -> Iterator[DecoderState]:
        """A state for the duration of a `with` block."""
        state = self.take()
        try:
            yield state
        finally:
            self.give(state)
