"""Decode-step cost vs context length: an fp32 KV cache against an fp16 one (`ortspec export --kv-dtype`).

Exports SOURCE (a checkpoint or GGUF) twice, `--kv-dtype fp32` and `--kv-dtype fp16`, unless the packages
are already in --work, and prints the CPU time of one decode step at each context length for both: the
median over --rounds rounds, each of --steps one-token steps per package, the packages alternating within
each round. One ONNX Runtime thread by default, so CPU time is the step's work (no spinning threads).

    python benchmarks/kv_dtype.py SmolLM2-135M-Instruct.Q4_1.gguf [--contexts 64 512 1024 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from matmul_study import cpu_summary

import ortspec
from ortspec.runtime.model.decoder import DecoderState

from common import exported

KV_DTYPES = ("fp32", "fp16")


def step_cpu_ms(state: DecoderState, context: int, tokens: list[int], steps: int) -> float:
    """Mean CPU ms of `steps` one-token steps from `context` cached positions (the cache rolled back first)."""
    state.truncate(context)
    start = time.process_time()
    for token in tokens[context : context + steps]:
        state.forward([token])
    return (time.process_time() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint directory or .gguf file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-kv-dtype"))
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    packages = {
        kv: exported(args.work / f"kv-{kv}", Path(args.source), quantize=args.quantize, kv_dtype=kv) for kv in KV_DTYPES
    }
    pipes = {kv: ortspec.load(path, threads=args.threads, verify=False) for kv, path in packages.items()}
    longest = max(args.contexts) + args.steps
    tokens = [(7 * i) % 1000 + 10 for i in range(longest)]
    states = {kv: DecoderState(pipe.target) for kv, pipe in pipes.items()}
    for state in states.values():
        state.forward(tokens[: max(args.contexts)])  # every context is a prefix of this one
    print(cpu_summary())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{args.quantize}, threads {args.threads}; CPU ms per decode step, median of {args.rounds} rounds of "
        f"{args.steps} steps, packages alternating"
    )
    args.contexts.sort()
    results: dict[str, list[float]] = {kv: [0.0] * len(args.contexts) for kv in KV_DTYPES}
    for i in reversed(range(len(args.contexts))):  # longest first: each later context is a rollback
        samples: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
        for _ in range(args.rounds):
            for kv, state in states.items():
                samples[kv].append(step_cpu_ms(state, args.contexts[i], tokens, args.steps))
        for kv in KV_DTYPES:
            results[kv][i] = statistics.median(samples[kv])
    print(f"{'KV cache':<12}" + "".join(f"{f'ctx {c}':>10}" for c in args.contexts) + f"{'last/first':>12}")
    for kv, values in results.items():
        mb = pipes[kv].target.cache_bytes() / 2**20
        print(f"{kv:<12}" + "".join(f"{v:>10.2f}" for v in values) + f"{values[-1] / values[0]:>12.2f}  ({mb:.0f} MiB)")
    ratios = [b / a for a, b in zip(results["fp32"], results["fp16"], strict=True)]
    print(f"{'fp16 / fp32':<12}" + "".join(f"{r:>10.2f}" for r in ratios))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
