"""Continuous batching: sequences decoding at the same time share target calls.

A `BatchedModel` keeps the KV buffers of `rows` sequences in one [rows, kv_heads, positions, head_dim]
array per layer and K/V, and hands out a `RowState` per generation: a `DecoderState` whose cache is
its row. A row's one-token forwards (plain decoding, or a round where the drafter proposed nothing)
wait at `step`, where one thread runs them all in ONE call with per-row `seqlens_k`; its longer
forwards (the prefill, verifying drafts) run alone on the row, batch 1 (GroupQueryAttention on CPU
takes a batch > 1 only for one new token per row; a long prefill as chunks, `PREFILL_CHUNK`, between
which the other rows step): a drafting row's verify holds up the others, so
auto γ weighs it against what a plain round adds to the batched step (`in_use` rows; see
`AutoDraftLength`). The speculative loop, drafters and sampling are untouched and stay per
generation: a row's logits are the ones it would get alone (up to float rounding), so greedy output
does not depend on what else runs.

Rolling back stays O(1): a call writes each bound row's new entry at that row's length, past
everything it holds. Rows in the call's range that are not stepping write a throwaway entry at their
length too, which their next call overwrites (a full row at its last position: to forward again it
must first roll back, and its next call rewrites everything from there). Free rows do the same, so a
released row keeps its last sequence for a generation whose prompt starts with it (a prefix cache;
a prompt is never longer than the context less one position, so the last position is never reused).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from ortspec.runtime.model.decoder import DecoderState, best_reuse
from ortspec.runtime.model.kv_cache import SharedBufferKVCache
from ortspec.runtime.model.onnx_model import Model, bind_logits_to_keep, check_caches_fit
from ortspec.runtime.package import graph_names as names

DEFAULT_WAIT = 0.004  # seconds a step waits for the other decoding rows to join it


def batch_problem(model: Model) -> str | None:
    """Why `model` cannot step several sequences in one call, or None when it can."""
    inputs = {i.name: i for i in model.session.get_inputs()}
    if model.layout != names.SHARED_BUFFER:
        return "its graph has the concat KV layout (optimum's exporter); the builder's graphs batch"
    if inputs[names.INPUT_IDS].shape[0] == 1:
        return "its graph has a fixed batch of 1; re-export it with this ortspec"
    if model.device != "cpu":
        return f"batching runs on the CPU only, the model runs on {model.device}"
    if model.spec.long_rope_after is not None:
        return "longrope switches rotary tables for the whole batch"
    if model.feature_size:
        return "a draft head's graph reads features per sequence"
    return None


class _Job:
    """One row's one-token forward, waiting for the next batched call."""

    __slots__ = ("done", "error", "hidden", "logits", "state", "token")

    def __init__(self, state: RowState, token: int) -> None:
        self.state = state
        self.token = token
        self.logits: np.ndarray | None = None
        self.hidden: np.ndarray | None = None  # the row's final features [1, hidden], when the model keeps them
        self.error: BaseException | None = None
        self.done = False


class BatchedModel:
    """`rows` sequences of one model whose one-token steps share calls. Thread-safe: each generation
    holds one row (`take` / `release`), in its own thread.

    A step waits up to `wait` seconds for the other rows to join it, so one call serves them all; rows
    whose last forward verified drafts are not waited for: a drafting row would keep the others waiting
    for a step it is not going to take.
    """

    def __init__(self, model: Model, rows: int, wait: float = DEFAULT_WAIT) -> None:
        if rows < 1:
            raise ValueError(f"a batch needs at least one row, got {rows}")
        if problem := batch_problem(model):
            raise ValueError(f"the {model.spec.role} model cannot batch: {problem}")
        check_caches_fit([model], rows, "a batch (generations decoding at once)")
        spec = model.spec
        self.model = model
        self.rows = rows
        self.wait = wait
        self.max_length = model.max_length
        shape = (rows, spec.num_kv_heads, model.max_length, spec.head_dim)
        self.buffers = [np.zeros(shape, model.cache_dtype) for _ in names.past_names(spec.num_layers)]
        self._free = list(range(rows - 1, -1, -1))  # lowest row first: calls bind rows [0, highest in use]
        self._states: dict[int, RowState] = {}  # rows held by generations
        self._kept: dict[int, RowState] = {}  # free rows' states, holding their last sequence
        self._run_lock = threading.Lock()  # one call at a time on the buffers
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._leading = False  # a thread is gathering or running the next batched call
        self._bindings: dict[int, ort.IOBinding] = {}
        self.calls = 0  # batched calls so far
        self.stepped = 0  # row steps they ran (stepped / calls: the mean batch)
        self.widest = 0  # the most rows one call stepped

    @property
    def in_use(self) -> int:
        """Rows held by generations."""
        return len(self._states)

    def take(self, prompt: Sequence[int] | None = None) -> RowState | None:
        """A free row, or None when all rows are in use: for a `prompt`, the row whose last sequence holds
        the longest prefix of it (see `DecoderState.reuse`), else the lowest free row; its state as its
        last generation left it."""
        with self._cond:
            if not self._free:
                return None
            kept = [self._kept[row] for row in self._free if row in self._kept]
            best = best_reuse(kept, prompt) if prompt is not None else None
            row = kept[best].row if best is not None else self._free[-1]
            self._free.remove(row)
            state = self._kept.pop(row, None) or RowState(self, row)
            state.stepping = True
            self._states[row] = state
            return state

    def release(self, state: RowState) -> None:
        """Free the row of `state` (its generation ended); the row keeps its sequence for a later `take`."""
        with self._cond:
            if self._states.get(state.row) is state:
                del self._states[state.row]
                self._kept[state.row] = state
                self._free.append(state.row)
                self._free.sort(reverse=True)
                self._cond.notify_all()  # a gathering step need not wait for it any more

    def row_buffers(self, row: int) -> list[ort.OrtValue]:
        """Row `row` of each buffer, as [1, kv_heads, positions, head_dim] OrtValues on the same memory."""
        return [ort.OrtValue.ortvalue_from_numpy(buffer[row : row + 1]) for buffer in self.buffers]

    @contextmanager
    def alone(self, state: RowState) -> Iterator[None]:
        """Hold the buffers for a batch-1 forward on the row of `state`, between batched calls."""
        if state.length:  # verifying drafts: likely to again next round (a prefill is followed by steps)
            with self._cond:
                state.stepping = False
                self._cond.notify_all()  # a gathering step need not wait for it any more
        with self._run_lock:
            yield

    def step(self, state: RowState, token: int) -> np.ndarray:
        """Logits [1, vocab] of `token` on the row of `state`, from a call shared with the other rows
        stepping now. The first thread to find no call being gathered leads the next one."""
        job = _Job(state, token)
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()
            while not job.done and (self._leading or job not in self._pending):
                self._cond.wait()
            if job.done:
                return self._result(job)
            self._leading = True
            jobs = self._gather()
        try:
            with self._run_lock:
                self._run(jobs)
        except BaseException as error:
            for waiting in jobs:
                waiting.error = error
        finally:
            with self._cond:
                for waiting in jobs:
                    waiting.done = True
                self._leading = False
                self._cond.notify_all()
        return self._result(job)

    def _gather(self) -> list[_Job]:
        """The pending jobs, once every row that may step has joined or `wait` has passed (holding `_cond`)."""
        deadline = time.monotonic() + self.wait
        while (left := deadline - time.monotonic()) > 0:
            joined = {job.state.row for job in self._pending}
            if all(row in joined for row, state in self._states.items() if state.stepping):
                break
            self._cond.wait(left)
        jobs, self._pending = self._pending, []
        return jobs

    @staticmethod
    def _result(job: _Job) -> np.ndarray:
        if job.error is not None:
            raise job.error
        assert job.logits is not None
        return job.logits

    def _binding(self, bound: int) -> ort.IOBinding:
        """The IO binding of a call over rows [0, bound): the first `bound` rows of each buffer."""
        binding = self._bindings.get(bound)
        if binding is None:
            binding = self._bindings[bound] = self.model.session.io_binding()
            binding.bind_output(names.LOGITS, "cpu")
            spec = self.model.spec
            pasts, presents = names.past_names(spec.num_layers), names.present_names(spec.num_layers)
            for past, present, buffer in zip(pasts, presents, self.buffers, strict=True):
                shape = [bound, *buffer.shape[1:]]
                pointer = buffer.ctypes.data  # rows are contiguous: [0, bound) is a prefix of the array
                binding.bind_input(past, "cpu", 0, buffer.dtype, shape, pointer)
                binding.bind_output(present, "cpu", 0, buffer.dtype, shape, pointer)
            if self.model.keep_hidden:
                binding.bind_output(names.HIDDEN_STATES, "cpu")  # the last output, as in DecoderState
            bind_logits_to_keep(self.model, binding, 0)
        return binding

    def _run(self, jobs: list[_Job]) -> None:
        """One call stepping every job's row; other rows in range write a throwaway entry past their end."""
        bound = max(job.state.row for job in jobs) + 1
        tokens = np.zeros((bound, 1), np.int64)
        last = self.max_length - 1
        with self._cond:  # rows that are not stepping: at their length (free rows too), a full row at its last
            held = [self._states.get(r) or self._kept.get(r) for r in range(bound)]
            lengths = [min(state.length, last) if state is not None else 0 for state in held]
        seqlens = np.array(lengths, np.int32)
        for job in jobs:
            tokens[job.state.row, 0] = job.token
            seqlens[job.state.row] = job.state.length
        binding = self._binding(bound)
        binding.bind_cpu_input(names.INPUT_IDS, tokens)
        binding.bind_cpu_input(names.SEQLENS_K, seqlens)  # each row's total length - 1
        binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(seqlens.max() + 1, np.int32))
        binding.bind_output(names.LOGITS, "cpu")
        if self.model.keep_hidden:
            binding.bind_output(names.HIDDEN_STATES, "cpu")
        self.model.session.run_with_iobinding(binding)
        outputs = binding.get_outputs_as_ortvaluevector()
        logits = outputs[0].numpy()
        hidden = outputs[len(outputs) - 1].numpy() if self.model.keep_hidden else None
        for job in jobs:
            job.logits = np.array(logits[job.state.row], dtype=np.float32)  # a copy: the binding reuses it
            if hidden is not None:
                job.hidden = np.array(hidden[job.state.row])
            job.state.stepped(job.token, job.hidden)  # now, before the next call reads its length
        self.calls += 1
        self.stepped += len(jobs)
        self.widest = max(self.widest, len(jobs))


class RowState(DecoderState):
    """A `DecoderState` on one row of a `BatchedModel`: its one-token forwards join batched calls."""

    def __init__(self, batch: BatchedModel, row: int) -> None:
        model = batch.model
        spec = model.spec
        cache = SharedBufferKVCache(
            names.past_names(spec.num_layers),
            names.present_names(spec.num_layers),
            spec.num_kv_heads,
            spec.head_dim,
            batch.max_length,
            model.cache_dtype,
            buffers=batch.row_buffers(row),
        )
        super().__init__(model, cache)
        self.batch = batch
        self.row = row
        self.stepping = True  # the next step waits for this row (unless its last forward verified drafts)

    def _run(self, token_ids: Sequence[int], features: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """One token joins a batched call; longer forwards run as a lone `DecoderState`, batch 1."""
        if len(token_ids) == 1 and features is None:
            return self.batch.step(self, int(token_ids[0]))
        with self.batch.alone(self):
            return super()._run(token_ids, features, last_only)

    def stepped(self, token: int, hidden: np.ndarray | None = None) -> None:
        """Count `token` in the cache (and keep its features): the batched call that wrote it does so
        before it lets go of the buffers, or the next call would take the row's old length and overwrite
        the new entry."""
        past = self.cache.length
        self.cache.update((), 1)
        self._tokens[past:] = [token]
        if hidden is not None:
            self.keep_hidden_states(hidden, past)
        self.stepping = True
