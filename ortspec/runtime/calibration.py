"""Measured step costs of a pair on this machine, and the speedup model built on them.

Speculation pays only when the acceptance rate α, the draft's step cost c and the target's verify
cost v(n) line up; on quantized CPU kernels v(n) grows with the number of positions n. We measure
t(n) (target call with n new positions) and d (one draft step) at a few context lengths, store them
beside the manifest (`calibration.json`, keyed by providers, threads and a machine fingerprint; never
inside a checksummed file) and predict the throughput of every γ:

    tokens per round E(α, γ) = (1 - α^(γ+1)) / (1 - α)
    time per round           = γ·d + t(γ+1)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .decoder import Decoder

CALIBRATION_FILE = "calibration.json"
DEFAULT_CONTEXTS = (64, 256, 1024)


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

    @property
    def max_gamma(self) -> int:
        return len(self.target_ms[0]) - 1

    def _at(self, values: Sequence[float], context: int) -> float:
        """Linear interpolation over the calibrated contexts (clamped at the ends)."""
        return float(np.interp(context, self.contexts, values))

    def target(self, positions: int, context: int) -> float:
        """ms of a target call adding `positions` positions on top of `context`."""
        return self._at([row[positions - 1] for row in self.target_ms], context)

    def draft(self, context: int) -> float:
        return self._at(self.draft_ms, context)

    def throughput(self, alpha: float, gamma: int, context: int, draft_cost: bool = True) -> float:
        """Predicted tokens per ms with γ drafts per round (γ = 0: plain decoding)."""
        cost = self.target(gamma + 1, context) + (gamma * self.draft(context) if draft_cost else 0.0)
        return tokens_per_round(alpha, gamma) / cost

    def predicted_speedup(self, alpha: float, gamma: int, context: int, draft_cost: bool = True) -> float:
        return self.throughput(alpha, gamma, context, draft_cost) / self.throughput(alpha, 0, context)

    def best_gamma(self, alpha: float, context: int, draft_cost: bool = True, min_gain: float = 1.05) -> int:
        """The γ with the highest predicted throughput; 0 unless it beats plain decoding by `min_gain`."""
        plain = self.throughput(alpha, 0, context)
        gamma = max(range(1, self.max_gamma + 1), key=lambda g: self.throughput(alpha, g, context, draft_cost))
        return gamma if self.throughput(alpha, gamma, context, draft_cost) >= min_gain * plain else 0


def _call_ms(decoder: Decoder, tokens: list[int], positions: Sequence[int], repeats: int) -> list[float]:
    """Median ms of calls adding each of `positions` new positions on top of `tokens` (rolled back after)."""
    decoder.reset()
    decoder.forward(tokens)
    medians = []
    for n in positions:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            decoder.forward(tokens[:n])
            elapsed = time.perf_counter() - start
            decoder.truncate(len(tokens))
            if i:  # the first call warms up
                times.append(elapsed * 1000)
        medians.append(statistics.median(times))
    decoder.reset()
    return medians


def measure(
    target: Decoder,
    draft: Decoder | None,
    key: str,
    max_gamma: int = 8,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    repeats: int = 5,
) -> Calibration:
    """Time the target for 1..max_gamma+1 positions and the draft for one, at each context length."""
    limit = min(target.max_length, draft.max_length if draft else target.max_length) - max_gamma - 1
    if limit < 1:
        raise ValueError(f"a context of {target.max_length} positions is too short to calibrate γ up to {max_gamma}")
    usable = sorted({min(c, limit) for c in contexts if c > 0})
    vocab = min(target.vocab_size, draft.vocab_size if draft else target.vocab_size)
    tokens = [(17 * i + 5) % vocab for i in range(max(usable))]
    target_ms, draft_ms = [], []
    for context in usable:
        target_ms.append(_call_ms(target, tokens[:context], range(1, max_gamma + 2), repeats))
        draft_ms.append(_call_ms(draft, tokens[:context], [1], repeats)[0] if draft is not None else 0.0)
    return Calibration(key, usable, target_ms, draft_ms)


def calibration_key(providers: Sequence[str], threads: int | None, draft_threads: int | None = None) -> str:
    draft = f"|draft threads={draft_threads}" if draft_threads else ""
    return f"{','.join(providers)}|threads={threads or 'default'}{draft}|{machine_fingerprint()}"


def load_calibration(package: Path, key: str) -> Calibration | None:
    """The stored calibration for `key`, if any."""
    path = Path(package) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("calibrations", [])
    except (json.JSONDecodeError, AttributeError):
        return None  # a damaged file is just remeasured
    for entry in entries:
        if entry.get("key") == key:
            return Calibration(**entry)
    return None


def save_calibration(package: Path, calibration: Calibration) -> bool:
    """Store (replacing the same key); False when the package directory is read-only."""
    path = Path(package) / CALIBRATION_FILE
    entries = []
    if path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8")).get("calibrations", [])
        except (json.JSONDecodeError, AttributeError):
            entries = []
    entries = [e for e in entries if e.get("key") != calibration.key] + [asdict(calibration)]
    try:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"calibrations": entries}, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        return False
    return True
