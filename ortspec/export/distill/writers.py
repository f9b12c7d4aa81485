"""Chats written by several processes at once, each writing several chats at once.

On a few CPU cores a single-row int4 decode step does not speed up with more threads (their
synchronisation costs what the work gains), so N processes with a share of the threads each make
more chats per second than one process with all of them. Each writer loads the package itself,
samples requests from its own share of the seeds and sends (chat, features) back; only the parent
writes them to disk, so the stores stay consistent. Ctrl-C and SIGTERM reach the parent, which stops
its writers; a writer whose parent is gone stops after its current chat.

Within a process, `rows` threads write chats side by side on one target whose one-token steps they
share (continuous batching, `BatchedModel`): one call for several rows costs far less than one call
each, since a step's time goes into reading the weights and per-node overheads.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data import self_instructed_chats, writer_seeds
from .features import open_target

Chat = tuple[dict[str, Any], np.ndarray]
Requests = list[list[dict[str, str]]]
MAX_DEFAULT_WRITERS = 8  # each writer holds its own copy of the target in memory
ROWS_IN_ALL = 32  # chats written at once over all writers by default: each holds a KV cache of its own
DEFAULT_BATCH_RANGE = (4, 16)  # chats per writer by default (more rows per process: Python threads contend)


def default_writers(threads: int | None) -> int:
    """One writer per core (per thread when `threads` is given), at most MAX_DEFAULT_WRITERS."""
    return max(1, min(threads or os.cpu_count() or 1, MAX_DEFAULT_WRITERS))


def default_batch(writers: int) -> int:
    """Chats each of `writers` writes at once by default: ROWS_IN_ALL shared out, 4 to 16 each.

    A batched step costs less per row the more rows join it (SmolLM2-135M int4, 2 writers x 1 thread,
    `benchmarks/distill_data_rate.py`: 4 rows each made 279-311 chat tokens per second, 16 rows 317-360,
    14-22% more in each of 4 paired trials; 32 rows 246), and each row holds a KV cache of its own, so
    the total stays bounded however many writers there are."""
    low, high = DEFAULT_BATCH_RANGE
    return min(high, max(low, ROWS_IN_ALL // max(writers, 1)))


def write_chats(
    pipe: Any,
    package: Path,
    base_seed: int,
    writers: int,
    threads: int | None,
    max_answer_tokens: int,
    rows: int = 1,
    requests: Requests | None = None,
    todo: list[int] | None = None,
) -> Generator[Chat, None, None]:
    """Chats with their features: from `pipe` in this process when `writers` is 1, else from `writers`
    processes with threads // writers threads each, writing `rows` chats at once each (in this process:
    as many as `pipe`'s batch has rows). Sampled requests (seeds from `base_seed`) never run out; with
    `requests`, the chats at the indices `todo` (both given) are answered, then the iterator ends. Close the
    iterator to stop them early."""
    if writers == 1:
        rows = pipe.batch.rows if pipe.batch is not None else 1
        seeds = writer_seeds(base_seed, todo=todo)
        yield from chats_in_rows(pipe, seeds, rows, max_answer_tokens, requests)
        return
    context = multiprocessing.get_context("spawn")
    chats = context.Queue(maxsize=2 * writers)
    each = max(1, (threads or os.cpu_count() or 1) // writers)
    processes = [
        context.Process(
            target=_writer,
            args=(
                str(package),
                each,
                pipe.target.max_length,
                base_seed,
                k,
                writers,
                max_answer_tokens,
                rows,
                chats,
                requests,
                todo,
            ),
            daemon=True,
        )
        for k in range(writers)
    ]
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if on_main_thread else None
    try:
        for process in processes:
            process.start()
        finished = False  # every writer answered its given requests and exited
        while True:
            try:
                yield chats.get(timeout=0.1 if finished else 1.0)
            except queue.Empty:
                if finished:  # a writer flushes its queue before it exits: nothing more can come
                    return
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    message = f"a chat writer process failed (exit code {failed[0]}; its error is above)"
                    raise RuntimeError(message) from None
                finished = all(p.exitcode == 0 for p in processes)  # then read what is left, and end
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        chats.close()
        chats.cancel_join_thread()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `write_chats`, which stops its writers


def _writer(
    package: str,
    threads: int,
    max_length: int,
    base_seed: int,
    writer: int,
    writers: int,
    max_answer_tokens: int,
    rows: int,
    chats: Any,
    requests: Requests | None = None,
    todo: list[int] | None = None,
) -> None:
    """One writer process: chats from seeds writer, writer + writers, ... (of `todo`, with `requests`)
    into the `chats` queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    parent = os.getppid()
    pipe = open_target(Path(package), threads, max_length, rows)
    seeds = writer_seeds(base_seed, writer, writers, todo)
    for chat in chats_in_rows(pipe, seeds, rows, max_answer_tokens, requests):
        while True:
            if os.getppid() != parent:  # the parent was killed: nobody will read this
                return
            try:
                chats.put(chat, timeout=1.0)
                break
            except queue.Full:
                pass


def chats_in_rows(
    pipe: Any, seeds: Iterator[int], rows: int, max_answer_tokens: int, requests: Requests | None = None
) -> Iterator[Chat]:
    """`self_instructed_chats` from `rows` threads at once on `pipe`, drawing on one stream of seeds; in the
    order they finish, until the seeds run out. Close the iterator to stop them (each finishes the chat it
    is writing)."""
    if rows <= 1:
        yield from self_instructed_chats(pipe, seeds, max_answer_tokens=max_answer_tokens, requests=requests)
        return
    lock, stop = threading.Lock(), threading.Event()
    done: queue.Queue[Any] = queue.Queue(maxsize=2 * rows)  # chats, errors and `finished`
    finished = object()  # a row's last word: its seeds ran out

    def shared_seeds() -> Iterator[int]:
        while not stop.is_set():
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            yield seed

    def write() -> None:
        try:
            for chat in self_instructed_chats(
                pipe, shared_seeds(), max_answer_tokens=max_answer_tokens, requests=requests
            ):
                while not stop.is_set():
                    try:
                        done.put(chat, timeout=0.5)
                        break
                    except queue.Full:
                        pass
            done.put(finished)
        except BaseException as error:  # handed to the reader, who raises it
            done.put(error)

    threads = [threading.Thread(target=write, daemon=True, name=f"chat-row-{k}") for k in range(rows)]
    for thread in threads:
        thread.start()
    try:
        running = rows
        while running:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            if item is finished:
                running -= 1
                continue
            yield item
    finally:
        stop.set()
        for thread in threads:  # each ends after its current chat
            thread.join(timeout=60)
