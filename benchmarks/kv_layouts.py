"""Decode-step cost vs context length: the builder's shared KV buffer vs optimum's concat cache.

Exports the same random-weight ~130M Llama-shaped checkpoint (int4) both ways and prints ms per
decode step at several context lengths, measured in one run, and each layout's long/short ratio.

    python benchmarks/kv_layouts.py [--work /tmp/ortspec-bench] [--contexts 128 512 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ortspec
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model

from common import bench_checkpoints, exported


def step_ms(model: Model, context: int, steps: int = 16, repeats: int = 3) -> float:
    """Median ms of `steps` consecutive single-token steps starting at `context` cached positions."""
    tokens = [(7 * i) % 1000 + 10 for i in range(context + steps)]
    decoder = DecoderState(model)
    decoder.forward(tokens[:context])
    times = []
    for _ in range(repeats):
        decoder.truncate(context)
        for t in tokens[context : context + steps]:
            start = time.perf_counter()
            decoder.forward([t])
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def build(work: Path, quantize: str) -> dict[str, Path]:
    target, _ = bench_checkpoints(work)
    return {
        exporter: exported(work / f"{exporter}-{quantize}", target, quantize=quantize, exporter=exporter)
        for exporter in ("builder", "optimum")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-bench"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    packages = build(args.work, args.quantize)
    pipes = {name: ortspec.load(path, threads=args.threads, verify=False) for name, path in packages.items()}
    results: dict[str, list[float]] = {name: [] for name in pipes}
    for context in args.contexts:  # layouts alternate at each context length
        for name, pipe in pipes.items():
            results[name].append(step_ms(pipe.target, context))
    print(f"ms per decode step ({args.quantize}, threads {args.threads or 'default'}), median of 48 steps")
    print(f"{'layout':<24}" + "".join(f"{f'ctx {c}':>10}" for c in args.contexts) + f"{'last/first':>12}")
    for name, values in results.items():
        layout = pipes[name].manifest.target.kv_layout
        print(
            f"{name + ' (' + layout + ')':<24}"
            + "".join(f"{v:>10.2f}" for v in values)
            + f"{values[-1] / values[0]:>12.2f}"
        )
    ratios = [b / o for b, o in zip(results["builder"], results["optimum"], strict=True)]
    print(f"{'builder / optimum':<24}" + "".join(f"{r:>10.2f}" for r in ratios))


if __name__ == "__main__":
    main()
