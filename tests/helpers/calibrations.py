"""Synthetic calibrations: round costs made up to steer the γ choice in tests."""

from __future__ import annotations

from ortspec.runtime.speculation.calibration import Calibration


def synthetic(
    draft_ms: float = 1.0, verify_growth: float = 0.1, round_overhead: float | None = None, catch_up_ms: float = 0.0
) -> Calibration:
    """Target 10 ms per step at context 100 (15 ms at 1000); each extra position adds `verify_growth`.
    With `round_overhead`, whole rounds were timed too and took that many ms more than their parts;
    `catch_up_ms`: the draft reading 64 tokens at once."""
    rows = [[base * (1 + verify_growth * (n - 1)) for n in range(1, 10)] for base in (10.0, 15.0)]
    drafts = [draft_ms, draft_ms * 1.2]
    rounds = []
    if round_overhead is not None:
        rounds = [[g * d + row[g] + round_overhead for g in range(1, 9)] for row, d in zip(rows, drafts, strict=True)]
    return Calibration("test", [100, 1000], rows, drafts, rounds, [catch_up_ms, catch_up_ms] if catch_up_ms else [])
