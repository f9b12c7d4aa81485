"""Measured step costs of a pair on this machine, and the speedup model built on them.

Speculation pays only when the acceptance rate α, the draft's step cost c and the target's verify
cost v(n) line up; on quantized CPU kernels v(n) grows with the number of positions n. We measure,
at a few context lengths, t(n) (target call with n new positions), d (one draft step), the draft's
catch-up on unseen tokens and whole rounds r(γ); store them (calibration_store: beside the manifest,
keyed by providers, threads and a machine fingerprint) and predict the throughput of every γ:

    tokens per round E(α, γ) = (1 - α^(γ+1)) / (1 - α)
    time per round r(γ)      = γ draft steps then one verify call of γ+1 positions, timed back to back

r(γ) is timed as the loop runs it rather than summed from parts, because on a few cores the two
sessions' thread pools compete: right after the draft runs, its spinning workers slow the target.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model

CALIBRATION_VERSION = 3  # part of the key: entries measured the older way are remeasured (3: catch-up scores its last)
MIN_GAIN = 1.05  # drafting must be predicted to beat plain decoding by 5%
CATCH_UP = 64  # tokens of the timed draft catch-up (the draft proposer's default window)
DEFAULT_CONTEXTS = (64, 256, 1024)
MIN_ROW_SHARE = 0.05  # the least share of a one-token step that a row of a batched step is taken to cost


def machine_fingerprint() -> str:
    """What makes timings comparable: CPU model, core count, architecture and ORT version."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}|{cpu}|{os.cpu_count()} cpus|onnxruntime {ort.__version__}"


def tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected tokens committed by one target call that verifies γ drafts accepted i.i.d. with α."""
    if gamma == 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass(frozen=True)
class Calibration:
    """Step costs (ms) at several context lengths, for one providers/threads/machine key."""

    key: str
    contexts: list[int]
    target_ms: list[list[float]]  # [context][n - 1]: target call adding n positions, n = 1..len
    draft_ms: list[float]  # [context]: one draft step (0 without a draft model)
    round_ms: list[list[float]] = field(default_factory=list)  # [context][γ - 1]: γ draft steps + verify
    catch_up_ms: list[float] = field(default_factory=list)  # [context]: the draft reading CATCH_UP tokens at once

    @property
    def max_gamma(self) -> int:
        return len(self.target_ms[0]) - 1

    def _at(self, values: Sequence[float], context: int) -> float:
        """Linear interpolation over the calibrated contexts (clamped at the ends)."""
        return float(np.interp(context, self.contexts, values))

    def target(self, positions: int, context: int) -> float:
        """ms of a target call adding `positions` positions on top of `context`."""
        return self._at([row[positions - 1] for row in self.target_ms], context)

    def batched_step(self, rows: int, context: int) -> float:
        """ms one sequence adds to a batched one-token step of `rows` sequences (continuous batching): the
        step reads the weights once for all rows, as a call of `rows` positions does, so each row beyond
        the first costs what a position beyond the first adds, t(rows) - t(1) over rows - 1 (the mean
        of the calibrated positions, which are noisy one by one); alone, a whole step. At least
        MIN_ROW_SHARE of a step."""
        if rows <= 1:
            return self.target(1, context)
        rows = min(rows, self.max_gamma + 1)  # the widest calibrated call: the slope of the last positions holds
        step = self.target(1, context)
        return max((self.target(rows, context) - step) / (rows - 1), MIN_ROW_SHARE * step)

    def draft(self, context: int) -> float:
        """ms of one draft step on top of `context`."""
        return self._at(self.draft_ms, context)

    def catch_up(self, tokens: int, context: int) -> float:
        """ms for the draft to read `tokens` committed tokens it has not seen (0 without a draft model)."""
        if not self.catch_up_ms or tokens <= 0:
            return 0.0
        return self._at(self.catch_up_ms, context) * tokens / CATCH_UP

    def round(self, gamma: int, context: int, draft_cost: bool = True) -> float:
        """ms of one round with γ drafts: the measured back-to-back time when the draft is a model."""
        if gamma == 0 or not draft_cost:
            return self.target(gamma + 1, context)
        if self.round_ms:
            return self._at([row[gamma - 1] for row in self.round_ms], context)
        return gamma * self.draft(context) + self.target(gamma + 1, context)

    def rounds(self, context: int, draft_cost: bool = True) -> list[float]:
        """ms of a round with γ = 0..max_gamma drafts at `context` (index γ). A round with more drafts
        never costs less than one with fewer: a measured dip (load on a shared machine) is noise."""
        return list(accumulate((self.round(g, context, draft_cost) for g in range(self.max_gamma + 1)), max))

    def predicted_speedup(self, alpha: float, gamma: int, context: int, draft_cost: bool = True) -> float:
        """Predicted throughput with γ drafts per round over plain decoding's."""
        return predicted_speedup(alpha, gamma, self.rounds(context, draft_cost))

    def best_gamma(self, alpha: float, context: int, draft_cost: bool = True) -> int:
        """The γ with the highest predicted throughput; 0 unless it beats plain decoding by 5%."""
        return best_gamma(alpha, self.rounds(context, draft_cost))

    def alpha_needed(self, context: int, draft_cost: bool = True) -> float | None:
        """The lowest acceptance rate (to 0.01) at which drafting is predicted to pay; None if not even at 0.99."""
        rounds = self.rounds(context, draft_cost)
        if best_gamma(0.99, rounds) == 0:
            return None
        low, high = 0.0, 0.99  # best_gamma(low) == 0 < best_gamma(high): bisect the boundary
        while high - low > 0.01:
            middle = (low + high) / 2
            low, high = (low, middle) if best_gamma(middle, rounds) else (middle, high)
        return high


def expected_tokens(acceptance: Sequence[float]) -> float:
    """Tokens a round is expected to commit when its drafts are accepted with these chances, each given
    that the drafts before it were accepted: 1 + Σ_i Π_{j≤i} a_j (the target's own token included)."""
    tokens, chain = 1.0, 1.0
    for chance in acceptance:
        chain *= chance
        tokens += chain
    return tokens


def round_speedup(tokens: float, gamma: int, rounds: Sequence[float], slowdown: float = 1.0) -> float:
    """`tokens` per round of rounds[γ]·slowdown ms, over plain decoding's one token per rounds[0] ms
    (`rounds[γ]`: the ms of a round with γ drafts; `slowdown`: how much slower drafted rounds really run)."""
    if gamma == 0:
        return 1.0
    return tokens * rounds[0] / (rounds[gamma] * slowdown)


def predicted_speedup(alpha: float, gamma: int, rounds: Sequence[float], slowdown: float = 1.0) -> float:
    """Predicted throughput with γ drafts per round, each accepted with chance α, over plain decoding's."""
    return round_speedup(tokens_per_round(alpha, gamma), gamma, rounds, slowdown)


def prefix_speedups(acceptance: Sequence[float], rounds: Sequence[float], slowdown: float = 1.0) -> list[float]:
    """Predicted speedup of sending the first 1, 2, ... drafts, given each one's chance of acceptance
    (given the ones before it were accepted); drafts beyond the calibrated round costs are never sent."""
    speedups, tokens, chain = [], 1.0, 1.0
    for gamma, chance in enumerate(acceptance[: len(rounds) - 1], start=1):
        chain *= chance
        tokens += chain
        speedups.append(round_speedup(tokens, gamma, rounds, slowdown))
    return speedups


def best_count(speedups: Sequence[float]) -> int:
    """How many leading drafts to send, given `prefix_speedups`: the count with the highest predicted
    speedup, 0 (plain decoding) unless it reaches MIN_GAIN."""
    best = max(speedups, default=0.0)
    return speedups.index(best) + 1 if best >= MIN_GAIN else 0


def best_prefix(acceptance: Sequence[float], rounds: Sequence[float], slowdown: float = 1.0) -> int:
    """How many leading drafts of a round to send, given each one's chance of acceptance (see
    `prefix_speedups` and `best_count`)."""
    return best_count(prefix_speedups(acceptance, rounds, slowdown))


def best_gamma(alpha: float, rounds: Sequence[float], slowdown: float = 1.0) -> int:
    """The γ with the highest predicted speedup at acceptance α; 0 (plain decoding) unless it reaches MIN_GAIN."""
    return best_prefix([alpha] * (len(rounds) - 1), rounds, slowdown)


STEADY_RUN = 3  # each timing is the mean of this many back-to-back repetitions, as the loop runs them
STEADY_UNDER_MS = 20.0  # target steps slower than this are timed once: warm caches matter little next to them


def _steady_ms(run: Callable[[], None], times: int) -> float:
    """ms per call of `run` repeated back to back: warm caches and pools, like consecutive rounds."""
    start = time.perf_counter()
    for _ in range(times):
        run()
    return (time.perf_counter() - start) * 1000 / times


def _measure_context(
    target: DecoderState,
    draft: DecoderState | None,
    tokens: list[int],
    max_gamma: int,
    repeats: int,
    budget_s: float,
) -> tuple[list[float], float, list[float], float]:
    """Median (target ms per n positions, draft step ms, round ms per γ, catch-up ms) on top of `tokens`.

    Each call kind is timed as the loop runs it: back to back, picking the argmax of every logits
    row it uses (a plain step right after a round would find the draft's weights in the CPU caches
    and be slower than in plain decoding). Every kind is timed once per pass and the passes repeat,
    so a burst of load on a shared machine touches all alike; caches are rolled back after each
    call. The first pass warms up, is dropped, and sizes the rest: 2 to `repeats` passes, as many
    as fit in `budget_s` (a large model on a CPU gets fewer, so that the first use stays short).
    """
    context = len(tokens)
    probe = (tokens * (max_gamma + 1))[: max_gamma + 1]  # tokens to add: any will do

    def target_call(n: int) -> None:
        target.forward(probe[:n]).argmax(axis=-1)
        target.truncate(context)

    def draft_step(draft: DecoderState) -> None:
        int(draft.forward(probe[:1])[-1].argmax())
        draft.truncate(context)

    def catch_up(draft: DecoderState) -> None:
        draft.truncate(max(0, context - CATCH_UP))
        draft.forward(tokens[-CATCH_UP:], last_only=True)  # as the loop's catch-up: the last position scored
        draft.truncate(context)

    def speculative_round(draft: DecoderState, gamma: int) -> None:
        for token in probe[:gamma]:
            int(draft.forward([token])[-1].argmax())
        draft.truncate(context)
        target_call(gamma + 1)

    def one_pass(steady: int) -> dict[str, float]:
        timings = {f"t{n}": _steady_ms(partial(target_call, n), steady) for n in range(1, max_gamma + 2)}
        if draft is not None:
            timings["d"] = _steady_ms(partial(draft_step, draft), steady)
            timings["c"] = _steady_ms(partial(catch_up, draft), steady) * CATCH_UP / min(CATCH_UP, context)
            for g in range(1, max_gamma + 1):
                timings[f"r{g}"] = _steady_ms(partial(speculative_round, draft, g), steady)
        return timings

    for decoder in (target, draft):
        if decoder is not None:
            decoder.reset()
            decoder.forward(tokens)
    start = time.perf_counter()
    warm = one_pass(1)
    steady = STEADY_RUN if warm["t1"] < STEADY_UNDER_MS else 1
    passes = max(2, min(repeats, int(budget_s / ((time.perf_counter() - start) * steady))))
    samples: dict[str, list[float]] = {}
    for _ in range(passes):
        for name, ms in one_pass(steady).items():
            samples.setdefault(name, []).append(ms)
    median = {name: statistics.median(values) for name, values in samples.items()}
    for decoder in (target, draft):
        if decoder is not None:
            decoder.reset()
    target_ms = [median[f"t{n}"] for n in range(1, max_gamma + 2)]
    if draft is None:
        return target_ms, 0.0, [], 0.0
    return target_ms, median["d"], [median[f"r{g}"] for g in range(1, max_gamma + 1)], median["c"]


def measure(
    target: Model,
    draft: Model | None,
    key: str,
    max_gamma: int = 8,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    repeats: int = 7,
    budget_s: float = 15.0,
) -> Calibration:
    """Time the target for 1..max_gamma+1 positions, the draft for one, and whole rounds of γ = 1..max_gamma
    drafts, at each context length, in about `budget_s` seconds (at least two passes each), on
    sequences of its own (generations running meanwhile are not disturbed, but slow the timings)."""
    limit = min(target.max_length, draft.max_length if draft else target.max_length) - max_gamma - 1
    if limit < 1:
        raise ValueError(f"a context of {target.max_length} positions is too short to calibrate γ up to {max_gamma}")
    usable = sorted({min(c, limit) for c in contexts if c > 0})
    vocab = min(target.vocab_size, draft.vocab_size if draft else target.vocab_size)
    tokens = [(17 * i + 5) % vocab for i in range(max(usable))]
    target_state, draft_state = DecoderState(target), DecoderState(draft) if draft else None
    target_ms, draft_ms, round_ms, catch_up_ms = [], [], [], []
    for context in usable:
        target_row, draft_step, round_row, catch_up = _measure_context(
            target_state, draft_state, tokens[:context], max_gamma, repeats, budget_s / len(usable)
        )
        target_ms.append(target_row)
        draft_ms.append(draft_step)
        round_ms.append(round_row)
        catch_up_ms.append(catch_up)
    if draft is None:
        return Calibration(key, usable, target_ms, draft_ms)
    return Calibration(key, usable, target_ms, draft_ms, round_ms, catch_up_ms)


def calibration_key(
    providers: Sequence[str],
    threads: int | None,
    draft_threads: int | None = None,
    draft_providers: Sequence[str] | None = None,
) -> str:
    """What a calibration is valid for: method version, providers (the draft's where they differ), thread
    counts and this machine."""
    draft = f"|draft threads={draft_threads}" if draft_threads else ""
    if draft_providers and list(draft_providers) != list(providers):
        draft += f"|draft providers={','.join(draft_providers)}"
    return f"v{CALIBRATION_VERSION}|{','.join(providers)}|threads={threads or 'default'}{draft}|{machine_fingerprint()}"
