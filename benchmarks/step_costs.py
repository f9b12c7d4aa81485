"""Step costs of a random-weight Llama-shaped pair of realistic proportions (~130M target, ~15M draft).

For fp32, int8 and int4 packages, prints in one run: ms per target decode step, ms per draft step,
c = draft/target, and v(n) = cost of verifying n positions / cost of one step, n = 1..γ+1, at the
given context length. These are the numbers the speedup model E/(γ·c + v(γ+1)) needs.

    python benchmarks/step_costs.py [--work /tmp/ortspec-bench] [--context 128] [--gamma 4] [--threads N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ortspec
from ortspec.runtime.speculation.calibration import measure

from common import bench_checkpoints, exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-bench"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    target, draft = bench_checkpoints(args.work)
    print(f"context {args.context}, threads {args.threads or 'default'}, median of {args.repeats} calls")
    print(
        f"{'weights':<8}{'target ms':>10}{'draft ms':>10}{'c':>7}"
        + "".join(f"{f'v({n})':>8}" for n in range(1, args.gamma + 2))
    )
    for quantize in ("none", "int8", "int4"):
        root = exported(args.work / f"pair-{quantize}", target, draft=draft, quantize=quantize)
        pipe = ortspec.load(root, threads=args.threads, verify=False)
        cal = measure(pipe.target, pipe.draft, "bench", args.gamma, [args.context], args.repeats)
        costs, draft_ms = cal.target_ms[0], cal.draft_ms[0]
        size = sum(f.size for f in pipe.manifest.target.files) / 1e6
        row = f"{quantize:<8}{costs[0]:>10.2f}{draft_ms:>10.2f}{draft_ms / costs[0]:>7.3f}"
        print(row + "".join(f"{c / costs[0]:>8.2f}" for c in costs) + f"   (target file {size:.0f} MB)")


if __name__ == "__main__":
    main()
