"""Prefill against the size of its calls: tokens/s of reading a fresh prompt with `PREFILL_CHUNK` set to each
size in turn, in one process, one pipeline per package (the first size is the baseline of the ratios).

    python benchmarks/prefill_chunks.py PACKAGE [PACKAGE ...] --tokens 500 --sizes 100000,128,64 --threads 2

Each repeat feeds a fresh prompt (token ids, a new one per repeat; `prefix_cache=False`) and generates one
token, every size in turn, so the sizes share the machine's load; repeat 0 warms up. Wall and CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ortspec
from ortspec.runtime.model import decoder

from common import load_average
from openvino_prefill import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--sizes", default="100000,128", help="PREFILL_CHUNK values, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    print(f"prompt {args.tokens} fresh tokens, 1 new, threads {args.threads}; load average {load_average()}")
    print(f"| package | PREFILL_CHUNK | wall tokens/s, median (range) | vs {sizes[0]} | CPU-time tokens/s |")
    print("|---|---|---|---|---|")
    for package in args.packages:
        pipe = ortspec.load(package, threads=args.threads, verify=False, prefix_cache=False)
        times: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
        for seed in range(args.repeats + 1):
            prompt = prompt_ids(args.tokens, seed, pipe.target.vocab_size)
            for size in sizes:
                decoder.PREFILL_CHUNK = size
                start, cpu = time.perf_counter(), time.process_time()
                pipe.generate(prompt, max_new_tokens=1, use_draft=False)
                if seed:
                    times[size].append((time.perf_counter() - start, time.process_time() - cpu))
        for size, values in times.items():
            rates = [args.tokens / wall for wall, _ in values]
            ratio = statistics.median(b[0] / v[0] for b, v in zip(times[sizes[0]], values, strict=True))
            cpu_rate = statistics.median(args.tokens / cpu for _, cpu in values)
            print(
                f"| {package.name} | {size} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
                f"| {ratio:.2f}x | {cpu_rate:.0f} |"
            )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
