"""What the benchmarks share: the random-weight ~130M/~15M Llama-shaped checkpoints and cached exports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ortspec.models.random import PRESETS, make_checkpoint


def bench_checkpoints(work: Path) -> tuple[Path, Path]:
    """(target, draft) checkpoint directories of the `bench` preset, created once in `work`."""
    target_sizes, draft_sizes = PRESETS["bench"]
    target, draft = work / "target", work / "draft"
    if not (target / "config.json").exists():
        make_checkpoint(target, "llama", **target_sizes)
    if not (draft / "config.json").exists():
        make_checkpoint(draft, "llama", seed=1, **draft_sizes)
    return target, draft


def exported(out: Path, target: Path, **export_options: Any) -> Path:
    """`out`, exported with `export_options` unless it already holds a package."""
    from ortspec.export import export_pair

    if not (out / "manifest.json").exists():
        export_pair(target, out, force=True, **export_options)
    return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: what other jobs on the machine were doing meanwhile."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
