"""Step costs of a random-weight Llama-shaped pair of realistic proportions (~130M target, ~15M draft).

For fp32, int8 and int4 packages, prints in one run: ms per target decode step, ms per draft step,
c = draft/target, and v(n) = cost of verifying n positions / cost of one step, n = 1..γ+1, all at
the same context length. These are the numbers the speedup model E/(γ·c + v(γ+1)) needs.

    python benchmarks/step_costs.py [--work /tmp/ortspec-bench] [--context 128] [--gamma 4] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ortspec
from ortspec.runtime.decoder import Decoder


def median_ms(decoder: Decoder, context: list[int], n: int, repeats: int) -> float:
    """Median time of one call adding `n` positions on top of `context` (rollback not timed)."""
    decoder.reset()
    decoder.forward(context)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        decoder.forward(context[:n])
        elapsed = time.perf_counter() - start
        decoder.truncate(len(context))
        if i >= 2:  # the first calls warm up
            times.append(elapsed)
    return statistics.median(times) * 1000


def build(work: Path) -> dict[str, Path]:
    from ortspec.export import export_pair
    from ortspec.models.random import PRESETS, make_checkpoint

    target_sizes, draft_sizes = PRESETS["bench"]
    target, draft = work / "target", work / "draft"
    if not (target / "config.json").exists():
        make_checkpoint(target, "llama", **target_sizes)
        make_checkpoint(draft, "llama", seed=1, **draft_sizes)
    packages = {}
    for quantize in ("none", "int8", "int4"):
        out = work / f"pair-{quantize}"
        if not (out / "manifest.json").exists():
            export_pair(target, out, draft=draft, quantize=quantize, force=True)
        packages[quantize] = out
    return packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-bench"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    packages = build(args.work)
    context = list(range(100, 100 + args.context))
    header = f"{'weights':<8}{'target ms':>10}{'draft ms':>10}{'c':>7}" + "".join(
        f"{f'v({n})':>8}" for n in range(1, args.gamma + 2)
    )
    print(f"context {args.context}, threads {args.threads or 'default'}, median of {args.repeats} calls")
    print(header)
    for quantize, root in packages.items():
        pipe = ortspec.load(root, threads=args.threads, verify=False)
        params = sum(f.size for f in pipe.manifest.target.files) / 1e6
        costs = [median_ms(pipe.target, context, n, args.repeats) for n in range(1, args.gamma + 2)]
        draft = median_ms(pipe.draft, context, 1, args.repeats)
        row = f"{quantize:<8}{costs[0]:>10.2f}{draft:>10.2f}{draft / costs[0]:>7.3f}"
        print(row + "".join(f"{c / costs[0]:>8.2f}" for c in costs) + f"   (target file {params:.0f} MB)")


if __name__ == "__main__":
    main()
