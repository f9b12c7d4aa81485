"""Step costs of a random-weight Llama-shaped pair of realistic proportions (~130M target, ~15M draft).

For fp32, int8 and int4 packages, prints in one run: ms per target decode step, ms per draft step,
c = draft/target, and v(n) = cost of verifying n positions / cost of one step, n = 1..γ+1, at the
given context length. These are the numbers the speedup model E/(γ·c + v(γ+1)) needs.
`--weights` picks the packages (int8-gemm: `--int8-kernel gemm`); `--shape` times a target alone of one of
benchmarks/scale.py's real shapes (random weights) instead of the bench pair.

    python benchmarks/step_costs.py [--work /tmp/ortspec-bench] [--context 128] [--gamma 4] [--threads N]
    python benchmarks/step_costs.py --shape 360M --weights int4 int8-gemm --gamma 7
    python benchmarks/step_costs.py --shape 1.17B --weights int4 int8-gemm --gamma 7 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from matmul_study import cpu_summary
from quantization_quality import call_costs
from scale import SHAPES, write_checkpoint

import ortspec
from ortspec.runtime.speculation.calibration import measure

from common import bench_checkpoints, exported, load_average

WEIGHTS = {
    "none": {"quantize": "none"},
    "int8-nbits": {"quantize": "int8", "int8_kernel": "nbits"},
    "int4": {"quantize": "int4"},
    "int8-gemm": {"quantize": "int8", "int8_kernel": "gemm"},
}


def cpu_costs(pipe: ortspec.Pipeline, args: argparse.Namespace, weights: str) -> None:
    """The target's t(n) and v(n) in CPU ms (medians of `args.passes` passes), for `--clock cpu`."""
    positions = range(1, args.gamma + 2)
    samples = [
        call_costs(pipe.target, time.process_time, 0, args.context, args.repeats, positions)
        for _ in range(args.passes + 1)
    ][1:]  # the first pass warms up
    t = [statistics.median(s[f"t({n})"] for s in samples) for n in positions]
    low, high = ([f(s[f"t({n})"] / s["t(1)"] for s in samples) for n in positions] for f in (min, max))
    size = sum(f.size for f in pipe.manifest.target.files) / 1e6
    print(
        f"{weights:<10}{t[0]:>10.2f}{'-':>10}{'-':>7}" + "".join(f"{x / t[0]:>8.2f}" for x in t) + f"   ({size:.0f} MB)"
    )
    print(f"{'':<27}v(n) range over passes: " + " ".join(f"{a:.2f}-{b:.2f}" for a, b in zip(low, high, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-bench"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", nargs="+", choices=list(WEIGHTS), default=["none", "int8-nbits", "int4"])
    parser.add_argument("--shape", choices=list(SHAPES), help="a target alone of this shape (no draft)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the target alone in this process's CPU time (use with --threads 1; shared machines)",
    )
    parser.add_argument("--passes", type=int, default=5, help="with --clock cpu: passes of `--repeats` calls each")
    args = parser.parse_args()
    if args.shape:
        target, draft = args.work / f"ckpt-{args.shape}", None
        if not (target / "model.safetensors").is_file():
            write_checkpoint(target, args.shape)
    else:
        target, draft = bench_checkpoints(args.work)
    print(cpu_summary())
    print(f"load average before: {load_average()}")
    print(f"context {args.context}, threads {args.threads or 'default'}, median of {args.repeats} calls")
    print(
        f"{'weights':<10}{'target ms':>10}{'draft ms':>10}{'c':>7}"
        + "".join(f"{f'v({n})':>8}" for n in range(1, args.gamma + 2))
    )
    for weights in args.weights:
        name = f"{args.shape}-{weights}" if args.shape else f"pair-{weights}"
        root = exported(args.work / name, target, draft=draft, **WEIGHTS[weights])
        pipe = ortspec.load(root, threads=args.threads, verify=False)
        if args.clock == "cpu":
            cpu_costs(pipe, args, weights)
            continue
        cal = measure(pipe.target, pipe.draft, "bench", args.gamma, [args.context], args.repeats)
        costs, draft_ms = cal.target_ms[0], cal.draft_ms[0]
        size = sum(f.size for f in pipe.manifest.target.files) / 1e6
        row = f"{weights:<10}{costs[0]:>10.2f}{draft_ms:>10.2f}{draft_ms / costs[0]:>7.3f}"
        print(row + "".join(f"{c / costs[0]:>8.2f}" for c in costs) + f"   (target file {size:.0f} MB)")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
