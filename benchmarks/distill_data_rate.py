"""How fast `ortspec distill` makes on-policy training data: chat tokens with their features per second.

Three ways, each a fresh process running for --seconds from loading the package on (end to end),
the same request seeds each time, alternated --rounds times so a shared machine's load hits all alike:

- re-read: the old path: each chat's answer by `Pipeline.generate`, then the whole chat re-read
  by the target for its features (as `distill` did before features were kept while writing);
- captured: features kept while the target answers (`greedy_answer`), one process, all threads;
- writers=N batch=1: the same in N processes with threads // N threads each (`write_chats`), one chat at
  a time each;
- writers=N batch=B: each process writes B chats side by side, their one-token steps batched (the
  default B is 4; give several B to compare them in one run).

    python benchmarks/distill_data_rate.py PACKAGE [--seconds 180] [--rounds 2] [--threads 2] [--writers 2] \
        [--batch 4 [8 ...]] [--old]

Only the last two run unless --old asks for the first two as well.

The rate counts the tokens of whole chats (prompt + answer) finished, over the time until the last one;
tok/cpu-s divides them by the CPU time of the trial (writers included, and the work after the
deadline they are stopped in), a measure less swayed by other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

MAX_ANSWER_TOKENS = 256


def reread_chats(package: Path, threads: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """The old data path: requests and greedy answers by `Pipeline.generate`, then a re-read for features."""
    import ortspec
    from ortspec.export.distill import MAX_SEQUENCE
    from ortspec.export.distill.data import request_seeds, user_turn_opening
    from ortspec.export.distill.features import open_target, sequence_features
    from ortspec.runtime.model.decoder import DecoderState

    pipe = ortspec.load(package, threads=threads, verify=False)
    reader = DecoderState(open_target(package, threads, MAX_SEQUENCE).target)
    opening, room = user_turn_opening(pipe), pipe.target.max_length
    for seed in request_seeds(0):
        request = pipe.generate(opening, max_new_tokens=80, temperature=1.0, top_p=0.95, seed=seed, use_draft=False)
        text = request.text.strip()
        if request.stats.finish_reason != "eos" or len(text) < 8:
            continue
        prompt = pipe.chat_prompt([{"role": "user", "content": text}])
        if len(prompt) >= room:
            continue
        answer = pipe.generate(prompt, max_new_tokens=min(MAX_ANSWER_TOKENS, room - len(prompt)), use_draft=False)
        tokens = prompt + answer.token_ids
        yield {"seed": seed, "tokens": tokens}, sequence_features(reader, tokens)


def written_chats(package: Path, threads: int, writers: int, batch: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """The new data path, as `distill` runs it."""
    from ortspec.export.distill import MAX_SEQUENCE
    from ortspec.export.distill.features import open_target
    from ortspec.export.distill.writers import write_chats

    pipe = open_target(package, threads, MAX_SEQUENCE, batch if writers == 1 else 1)
    yield from write_chats(pipe, package, 0, writers, threads, MAX_ANSWER_TOKENS, batch)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the writers, once stopped)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def one_trial(package: Path, mode: str, seconds: float, threads: int, writers: int, batch: int) -> dict[str, Any]:
    start = time.monotonic()
    chats = reread_chats(package, threads) if mode == "re-read" else written_chats(package, threads, writers, batch)
    tokens = count = 0
    last = start
    try:
        for item, features in chats:
            assert len(features) == len(item["tokens"])
            now = time.monotonic()
            if now - start > seconds:
                break
            tokens, count, last = tokens + len(item["tokens"]), count + 1, now
    finally:
        chats.close()  # stops the writer processes
    cpu = cpu_seconds()
    return {
        "mode": mode,
        "chats": count,
        "tokens": tokens,
        "seconds": last - start,
        "rate": tokens / max(last - start, 1e-9),
        "cpu_rate": tokens / max(cpu, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--old", action="store_true", help="also the re-read and captured paths")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # internal: run one trial in this process
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(one_trial(args.package, args.trial, args.seconds, args.threads, args.writers, args.batch[0])))
        return
    modes = (["re-read", "captured"] if args.old else []) + [
        f"writers={args.writers} batch={batch}" for batch in [1, *args.batch]
    ]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}
    print(f"{args.package}: {args.threads} threads, {args.seconds:.0f} s per trial, {args.rounds} rounds", flush=True)
    for round_ in range(args.rounds):
        for mode in modes:
            writers = args.writers if mode.startswith("writers") else 1
            batch = int(mode.split("batch=")[1]) if "batch=" in mode else 1
            trial = "written" if mode != "re-read" else "re-read"
            command = [sys.executable, __file__, str(args.package), "--trial", trial, "--seconds", str(args.seconds)]
            command += ["--threads", str(args.threads), "--writers", str(writers), "--batch", str(batch)]
            result = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)
            rates[mode].append(result["rate"])
            cpu_rates[mode].append(result["cpu_rate"])
            print(
                f"round {round_ + 1} {mode:<18} {result['chats']:>4} chats {result['tokens']:>7,} tokens "
                f"in {result['seconds']:6.1f} s: {result['rate']:6.1f} tok/s, {result['cpu_rate']:5.1f} tok/cpu-s "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    base = statistics.mean(rates[modes[0]])
    for mode in modes:
        r = rates[mode]
        print(
            f"{mode:<18} mean {statistics.mean(r):6.1f} tok/s (min {min(r):.1f}, max {max(r):.1f}), "
            f"{statistics.mean(r) / base:.2f}x {modes[0]}; {statistics.mean(cpu_rates[mode]):5.1f} tok/cpu-s"
        )


if __name__ == "__main__":
    main()
