"""Free drafting on real chats: plain vs prompt lookup (ngram) vs suffix drafting, edit-style and open chat.

Two prompt sets written for this benchmark: edit-style requests whose answers repeat the input (fix,
rewrite, annotate, convert) and open chat (questions, explanations, stories), rendered with the
package's chat template. Greedy, `--new` new tokens, plain and every mode run in turn on each prompt
(the order rotates from prompt to prompt) for `--repeats` passes, all in one process.

The suffix pool: before each suffix run it is set to the outputs (plain decoding's answers, computed
once up front) of the warm-up chats below and of every OTHER benchmark prompt of both sets — never
the measured prompt's own answer — except in the mode labelled "repeat", whose pool also holds the
measured prompt's earlier answer (a user asking again). What a run adds to the pool is dropped.
Each mode keeps its own confidence table (and auto γ state) through the whole run, first taught by
one untimed pass over the warm-up chats.

Outputs are compared with plain decoding's. On int4 graphs the kernels for one position and for
several round differently, so a greedy choice between near-tied logits can flip: a divergence whose
logit gap (bench.divergence_gap) is within the path noise measured here — the largest change of the
top-2 logit margin between decoding the plain answers token by token and reading them in one chunk —
is reported as a near-tie; anything beyond it as a mismatch. fp32 graphs must match exactly.

    python benchmarks/free_drafting.py /work/real/smollm2-int4 [--threads 2] [--new 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ortspec
from ortspec.runtime.bench import BenchReport, compare_modes, near_tie_for, path_noise
from ortspec.runtime.drafters.suffix import (
    LOCAL,
    MATCH_CLASSES,
    POOL,
    SHARES,
    ConfidenceBuckets,
    SuffixMemory,
    bucket_index,
)

EDIT = [
    "Fix the bug in this function:\n\n```python\ndef average(values):\n    total = 0\n    for value in values:\n"
    "        total += value\n    return total / len(values) + 1\n```",
    "Add type hints to this function:\n\n```python\ndef greet(name, times):\n    message = ''\n"
    "    for _ in range(times):\n        message += 'Hello, ' + name + '! '\n    return message\n```",
    "Rewrite this paragraph with the city changed from Paris to Rome:\n\nLast summer we spent two weeks in "
    "Paris. Every morning we walked along the river, bought fresh bread from a small bakery and planned the day "
    "over coffee. Paris was crowded, but the museums were worth every minute in line.",
    'Translate this JSON to YAML:\n\n{"name": "server", "port": 8080, "debug": false, "users": '
    '[{"name": "alice", "role": "admin"}, {"name": "bob", "role": "viewer"}]}',
    "Rename the variable `x` to `count` in this code:\n\n```python\nx = 0\nfor line in open('log.txt'):\n"
    "    if 'error' in line:\n        x += 1\nprint('errors:', x)\n```",
    "Correct the spelling mistakes in this text:\n\nThe wether was beautifull yesterday, so we desided to go "
    "to the beach. We swimmed in the ocean and builded a big sandcastle with our freinds.",
    "Add a docstring to this function:\n\n```python\ndef clamp(value, low, high):\n    if value < low:\n"
    "        return low\n    if value > high:\n        return high\n    return value\n```",
    "Convert this Python dictionary to JSON:\n\nconfig = {'host': 'localhost', 'port': 5432, 'user': 'admin', "
    "'tables': ['orders', 'customers', 'products'], 'timeout': 30}",
]
CHAT = [
    "What causes the seasons on Earth?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Why do cats purr?",
    "How do vaccines train the immune system?",
    "Describe the water cycle for a ten-year-old.",
]
WARMUP = [  # only ever warm the pool and the confidence tables: never measured
    "Fix the indentation of this code:\n\n```python\ndef square(n):\nreturn n * n\n```",
    "Rewrite this sentence in the past tense: I walk to the station and take the early train to work.",
    "Convert this list to a numbered list:\n\n- apples\n- bread\n- milk\n- eggs",
    "What is photosynthesis?",
    "Tell me a short story about a robot who learns to paint.",
    "How does a refrigerator keep food cold?",
]
MODES = {
    "ngram auto": dict(draft="ngram"),
    "ngram γ=3": dict(draft="ngram", draft_tokens=3),
    "suffix auto": dict(draft="suffix"),
    "suffix γ=3": dict(draft="suffix", draft_tokens=3),
    "suffix repeat": dict(draft="suffix"),  # pool holds the measured prompt's own earlier answer
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recalibrate", action="store_true", help="Measure the round costs again first.")
    args = parser.parse_args()

    pipe = ortspec.load(args.package, threads=args.threads)
    start = time.perf_counter()
    calibration = pipe.calibration(remeasure=args.recalibrate)
    print(
        f"calibration ({time.perf_counter() - start:.1f} s): t(n) ms at context {calibration.contexts[0]}: "
        + " ".join(f"{t:.1f}" for t in calibration.target_ms[0])
    )
    sets = {
        "edit": [pipe.chat_prompt([{"role": "user", "content": p}]) for p in EDIT],
        "chat": [pipe.chat_prompt([{"role": "user", "content": p}]) for p in CHAT],
    }
    warmup = [pipe.chat_prompt([{"role": "user", "content": p}]) for p in WARMUP]
    answers = {
        tuple(p): pipe.generate(p, max_new_tokens=args.new, use_draft=False).token_ids
        for p in [*warmup, *sets["edit"], *sets["chat"]]
    }
    noise = path_noise(pipe, [p for prompts in sets.values() for p in prompts], answers)
    print(f"path noise (largest top-2 margin change, token by token vs one chunk): {noise:.3f}")
    confidence = {mode: ConfidenceBuckets() for mode in MODES}

    def pool(measured: list[int] | None, own: bool) -> SuffixMemory:
        return answers_pool(answers, None if own else measured)

    for mode, options in MODES.items():  # teach each mode's confidence table and auto γ on the warm-up chats
        if options["draft"] == "suffix":
            for prompt in warmup:
                pipe.suffix_memory = pool(prompt, own=False)
                pipe.suffix_memory.confidence = confidence[mode]
                pipe.generate(prompt, max_new_tokens=args.new, **options)
        else:
            for prompt in warmup:
                pipe.generate(prompt, max_new_tokens=args.new, **options)

    print(
        f"{len(EDIT)} edit-style + {len(CHAT)} open-chat prompts, {args.new} new tokens, greedy, "
        f"{args.threads} threads, {args.repeats} repeats; pool: warm-up + other prompts' answers "
        f"({pool(None, own=False).pool.tokens} tokens in all)"
    )
    header = (
        f"{'set':<6}{'mode':<15}{'α':>6}{'accept':>8}{'mean γ':>8}{'tok/call':>9}{'plain t/s':>10}"
        f"{'spec t/s':>9}{'speedup':>9}{'decode':>8}  outputs vs plain"
    )
    for name, prompts in sets.items():

        def before_run(mode: str, index: int, prompts: list[list[int]] = prompts) -> None:
            if mode in MODES and MODES[mode]["draft"] == "suffix":
                pipe.suffix_memory = pool(prompts[index], own=mode == "suffix repeat")
                pipe.suffix_memory.confidence = confidence[mode]

        reports = compare_modes(
            pipe,
            prompts,
            MODES,
            max_new_tokens=args.new,
            repeats=args.repeats,
            warmup=False,
            before_run=before_run,
            near_tie=near_tie_for(noise),
        )
        print(header)
        for mode, report in reports.items():
            print(row(name, mode, report))
    print_confidence(confidence["suffix auto"])


def answers_pool(answers: dict[tuple, list[int]], leave_out: list[int] | None = None) -> SuffixMemory:
    """A suffix pool holding every (prompt, answer) but the answer to the prompt `leave_out`."""
    memory = SuffixMemory()
    for prompt, answer in answers.items():
        if list(prompt) != leave_out:
            memory.remember(prompt, answer)
    return memory


def measure_chat_sets(
    pipe: ortspec.Pipeline,
    sets: dict[str, list[list[int]]],
    warmup: list[list[int]],
    modes: dict[str, dict],
    new_tokens: int,
    repeats: int,
) -> tuple[float, dict[str, dict[str, BenchReport]]]:
    """(measured path noise, per set: compare_modes' reports) of `modes` on chat prompt ids, greedy.

    Plain answers of every prompt fill the suffix pool, which holds, when a prompt is measured, every answer
    but its own; the warm-up chats (never measured) teach auto γ and the suffix confidence table first.
    Divergences count as near-ties up to the measured path noise, capped at MAX_NEAR_TIE.
    """
    answers = {
        tuple(p): pipe.generate(p, max_new_tokens=new_tokens, use_draft=False).token_ids
        for p in [*warmup, *(p for prompts in sets.values() for p in prompts)]
    }
    noise = path_noise(pipe, [p for prompts in sets.values() for p in prompts], answers)
    for prompt in warmup:
        for options in modes.values():
            pipe.generate(prompt, max_new_tokens=new_tokens, **options)
    reports = {}
    for name, prompts in sets.items():

        def before_run(mode: str, index: int, prompts: list[list[int]] = prompts) -> None:
            if mode in ("suffix auto", "hybrid auto"):  # one confidence table across pools
                confidence = pipe.suffix_memory.confidence
                pipe.suffix_memory = answers_pool(answers, leave_out=prompts[index])
                pipe.suffix_memory.confidence = confidence

        reports[name] = compare_modes(
            pipe,
            prompts,
            modes,
            max_new_tokens=new_tokens,
            repeats=repeats,
            warmup=False,
            before_run=before_run,
            near_tie=near_tie_for(noise),
        )
    return noise, reports


def print_confidence(table: ConfidenceBuckets) -> None:
    """What suffix auto's confidence table learned: acceptance per source and match length (all shares)."""
    print("suffix auto, learned chance of acceptance by evidence (judged drafts, decayed counts):")
    print(f"{'source':<8}" + "".join(f"{f'match {bound}+':>14}" for bound in MATCH_CLASSES))
    for source, label in ((LOCAL, "sequence"), (POOL, "pool")):
        cells = []
        for length_class in range(len(MATCH_CLASSES)):
            indices = [bucket_index(source, length_class, share) for share in range(SHARES)]
            judged = sum(table.judged[i] for i in indices)
            accepted = sum(table.accepted[i] for i in indices)
            cells.append(f"{accepted / judged:.2f} ({judged:.0f})" if judged else "-")
        print(f"{label:<8}" + "".join(f"{cell:>14}" for cell in cells))
    print(f"{'':<8}by agreement of the continuations (all sources and lengths):")
    for share, label in enumerate(("< half agree", "most agree", "single occurrence", "several, all agree")):
        indices = [i for i in range(len(table.judged)) if i % SHARES == share]
        judged = sum(table.judged[i] for i in indices)
        accepted = sum(table.accepted[i] for i in indices)
        print(f"{'':<8}{label:<20}{accepted / judged if judged else float('nan'):.2f} ({judged:.0f})")


def row(name: str, mode: str, report: BenchReport) -> str:
    spec, plain = report.speculative, report.plain
    rounds = max(1, spec.target_calls - report.runs)
    drafted_rounds = rounds - spec.undrafted_rounds
    mean_gamma = spec.drafted / drafted_rounds if drafted_rounds > 0 else 0.0
    alpha = "-" if spec.alpha is None else f"{spec.alpha:.2f}"
    accept = "-" if spec.acceptance_rate is None else f"{spec.acceptance_rate:.2f}"
    if report.mismatches:
        outputs = "MISMATCH beyond a near-tie: " + "; ".join(d.describe() for d in report.mismatches)
    elif report.near_ties:
        worst = max(d.gap for d in report.near_ties)
        outputs = f"{report.runs - len(report.near_ties)}/{report.runs} identical, rest near-ties (gap <= {worst:.3f})"
    else:
        outputs = f"{report.runs}/{report.runs} identical"
    return (
        f"{name:<6}{mode:<15}{alpha:>6}{accept:>8}{mean_gamma:>8.2f}{report.tokens_per_target_call:>9.2f}"
        f"{plain.tokens_per_second:>10.1f}{spec.tokens_per_second:>9.1f}{report.speedup:>8.2f}x"
        f"{report.decode_speedup:>7.2f}x  {outputs}"
    )


if __name__ == "__main__":
    main()
