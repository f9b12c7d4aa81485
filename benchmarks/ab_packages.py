"""Two packages of one target (say, two draft heads) side by side in one process, prompt by prompt.

Runs apart on this shared machine differ by ±5-10% in plain decoding alone, more than two heads
differ; so both packages are loaded at once and every prompt goes through every (package, mode) in
turn, the order rotating from prompt to prompt. Each package's speedup is over its own plain
decoding. Every hybrid or suffix generation starts from an empty suffix pool: with repeats, a pool
would otherwise hold the same prompt's earlier answer. Prompts: benchmarks/free_drafting.py's
edit-style and open chats (greedy).

    python benchmarks/ab_packages.py PACKAGE_A PACKAGE_B [--threads 2] [--new 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import ortspec
from ortspec.runtime.drafters.suffix import SuffixMemory

from free_drafting import CHAT, EDIT

MODES = {
    "plain": dict(use_draft=False),
    "hybrid auto": dict(draft="hybrid"),
    "head auto": dict(draft="model"),
    "head γ=1": dict(draft="model", draft_tokens=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    pipes = {name: ortspec.load(path, threads=args.threads) for name, path in zip("AB", args.packages, strict=True)}
    for name, path in zip("AB", args.packages, strict=True):
        print(f"{name}: {path}")
    runs = [(name, mode) for mode in MODES for name in pipes]
    for pipe in pipes.values():  # calibrate and warm up before anything is timed
        pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, draft="model")
    print(f"{args.new} new tokens, greedy, {args.threads} threads, {args.repeats} repeats")
    print(f"{'set':<6}{'pkg':<5}{'mode':<13}{'tok/s':>8}{'speedup':>9}{'tok/call':>10}")
    for set_name, prompts in (("edit", EDIT), ("chat", CHAT)):
        totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0, 0])  # seconds, tokens, calls
        for _ in range(args.repeats):
            for index, prompt in enumerate(prompts):
                turn = index % len(runs)
                for name, mode in runs[turn:] + runs[:turn]:
                    pipe = pipes[name]
                    if mode != "plain":
                        confidence = pipe.suffix_memory.confidence
                        pipe.suffix_memory = SuffixMemory()
                        pipe.suffix_memory.confidence = confidence
                    start = time.perf_counter()
                    result = pipe.chat([{"role": "user", "content": prompt}], max_new_tokens=args.new, **MODES[mode])
                    total = totals[name, mode]
                    total[0] += time.perf_counter() - start
                    total[1] += len(result.token_ids)
                    total[2] += result.stats.target_calls
        for name, mode in sorted(totals, key=lambda run: (run[0], list(MODES).index(run[1]))):
            seconds, tokens, calls = totals[name, mode]
            plain_seconds, plain_tokens, _ = totals[name, "plain"]
            speedup = (tokens / seconds) / (plain_tokens / plain_seconds)
            print(f"{set_name:<6}{name:<5}{mode:<13}{tokens / seconds:>8.1f}{speedup:>8.3f}x{tokens / calls:>10.2f}")


if __name__ == "__main__":
    main()
