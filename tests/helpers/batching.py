"""Generations that decode side by side in a batch, whatever the threads' timing."""

from __future__ import annotations

import threading

import ortspec
from ortspec.runtime.model.batching import RowState


def start_together(pipe: ortspec.Pipeline, count: int) -> None:
    """Make the first `count` generations wait until all of them hold a row (so they decode side by side)."""
    barrier = threading.Barrier(count)
    take = pipe.target_states.take

    def take_then_wait(prompt: list[int] | None = None) -> RowState:
        state = take(prompt)
        barrier.wait(timeout=30)
        return state

    pipe.target_states.take = take_then_wait
