"""Slots: N generations at a time, each in a worker thread, behind a bounded queue.

A generation runs the blocking `Pipeline.stream` in a thread and hands its text deltas to the event
loop through an asyncio queue. Closing the async iterator (the client left, the request timed out)
stops the generation between two rounds; the slot is free again once its thread has let go of the
pipeline, never earlier.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..runtime import GenerationResult, Pipeline, TextStream, load
from ..runtime.model.onnx_model import check_caches_fit
from .errors import APIError

Job = Callable[[Pipeline], TextStream]  # starts a generation on a slot's pipeline (runs in its thread)
Event = str | GenerationResult  # what a generation hands the event loop: text deltas, then its result


def load_pipelines(package: str | Path, parallel: int, batch: bool = True, **load_options: Any) -> list[Pipeline]:
    """The pipeline of each slot: one thread-safe Pipeline shared by all (the weights are loaded once,
    each generation takes KV states of its own), keeping a state per slot for reuse. With `batch`, the
    slots' generations decode in rows of one batch and share target calls where the package allows
    (see `ortspec.runtime.model.batching`); elsewhere each decodes alone."""
    load_options.setdefault("idle_states", parallel)
    if batch:
        load_options.setdefault("batch", parallel)
    try:
        pipe = load(package, **load_options)
    except MemoryError:  # the machine's memory would hold them, but not what is left of it (or a ulimit)
        raise ValueError(f"parallel slots of {parallel}: out of memory for their KV caches: ask for fewer") from None
    check_caches_fit([m for m in (pipe.target, pipe.draft) if m is not None], parallel, "parallel slots")
    return [pipe] * parallel


class Slots:
    """Hands slots (a pipeline each, the same shared one or not) to generations: one generation per slot at
    a time, at most `max_queue` waiting."""

    def __init__(self, pipelines: Sequence[Pipeline], max_queue: int) -> None:
        if not pipelines:
            raise ValueError("serving needs at least one slot")
        self.size = len(pipelines)
        self.max_queue = max_queue
        self._free = list(pipelines)
        self._waiters: collections.deque[asyncio.Future[Pipeline]] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="ortspec-slot")
        self._mean_seconds = 1.0  # running mean of a generation's time, for Retry-After

    @property
    def busy(self) -> int:
        return self.size - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request (whole seconds, at least 1)."""
        return max(1, math.ceil(self._mean_seconds * (self.waiting + 1) / self.size))

    async def _acquire(self, timeout: float) -> Pipeline:
        if self._free and not self._waiters:
            return self._free.pop()
        if len(self._waiters) >= self.max_queue:
            raise APIError(
                429,
                f"the server is busy ({self.size} generating, {self.waiting} waiting): retry later",
                code="queue_full",
                retry_after=self.retry_after(),
            )
        handed: asyncio.Future[Pipeline] = asyncio.get_running_loop().create_future()
        self._waiters.append(handed)
        try:
            # shielded: a timeout must not lose a pipeline that was handed over at that moment
            await asyncio.wait_for(asyncio.shield(handed), timeout)
        except BaseException as exc:
            if handed.done() and not handed.cancelled():
                self._release(handed.result())
            else:
                handed.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(handed)
            if isinstance(exc, TimeoutError):
                raise APIError(
                    503,
                    f"no slot became free within the request timeout ({timeout:g}s): retry later",
                    code="timeout",
                    retry_after=self.retry_after(),
                ) from None
            raise
        return handed.result()

    def _finished(self, pipe: Pipeline, seconds: float) -> None:
        self._mean_seconds += 0.2 * (seconds - self._mean_seconds)
        self._release(pipe)

    def _release(self, pipe: Pipeline) -> None:
        """Give the pipeline to the longest waiting request, or back to the free list (on the event loop)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(pipe)
                return
        self._free.append(pipe)

    async def generate(self, job: Job, timeout: float) -> AsyncGenerator[Event, None]:
        """Wait for a slot, run `job` on it: text deltas, then the GenerationResult. Errors of the job
        are raised here; past `timeout` seconds (waiting included) the generation stops with a 503/504."""
        deadline = time.monotonic() + timeout
        pipe = await self._acquire(timeout)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Event | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                stop.set()

        def work() -> None:
            start = time.perf_counter()
            outcome: GenerationResult | BaseException | None = None
            try:
                outcome = _run(job, pipe, stop, emit)
            except BaseException as exc:
                outcome = exc
            finally:
                # the slot is freed before the outcome is handed over (the loop runs callbacks in order), so a
                # client that has its response never sees the slot still busy
                with contextlib.suppress(RuntimeError):  # a closed loop: nothing is left to serve
                    loop.call_soon_threadsafe(self._finished, pipe, time.perf_counter() - start)
            if outcome is not None:
                emit(outcome)

        loop.run_in_executor(self._executor, work)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise APIError(
                        504, f"the generation took longer than the request timeout ({timeout:g}s)", code="timeout"
                    ) from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            stop.set()  # the worker stops after its current round


def _run(
    job: Job, pipe: Pipeline, stop: threading.Event, emit: Callable[[Event | BaseException], None]
) -> GenerationResult | None:
    """Run one generation in the slot's thread, emitting its deltas and stopping between two rounds once
    `stop` is set; its result (None if stopped), once the stream has let go of the pipeline."""
    stream = job(pipe)
    try:
        for delta in stream:
            if stop.is_set():
                return None
            emit(delta)
    finally:
        stream.close()
    return stream.result
