"""How far a package's logits depend on how the sequence is cut into calls (the source of int4/int8 near-ties).

For each package, along its own plain greedy answers to chat prompts: the largest |logit difference| between
plain decoding's one-position steps and verify-shaped calls of 4 positions, and one call of the whole
sequence; the largest change of the top-2 margin (the bench's path noise); and the split into the two
causes: the same cache with a position fed alone vs as the first row of a 4-position call ("row"), and a
cache filled by one call vs by steps with the next position fed alone either way ("cache").

    python benchmarks/kernel_paths.py PACKAGE [PACKAGE ...] [--new 48] [--prompts 2] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import ortspec
from ortspec.models.catalog import DEMO_CHATS
from ortspec.runtime.bench import path_logits, path_noise
from ortspec.runtime.model.decoder import DecoderState


def split(state: DecoderState, sequence: list[int], start: int, stride: int = 8) -> tuple[float, float]:
    """(row, cache) effects: largest |logit difference| at positions start, start + stride, ..."""
    row = cache = 0.0
    for at in range(start, len(sequence) - 4, stride):
        state.reset()
        state.forward(sequence[:start])
        for token in sequence[start:at]:
            state.forward([token])
        alone = state.forward([sequence[at]])[-1]
        state.truncate(at)
        first_of_four = state.forward(sequence[at : at + 4])[0]
        state.reset()
        state.forward(sequence[:at])
        after_chunk = state.forward([sequence[at]])[-1]
        row = max(row, float(np.abs(alone - first_of_four).max()))
        cache = max(cache, float(np.abs(alone - after_chunk).max()))
    return row, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs="+")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'package':<40}{'verify':>9}{'chunk':>9}{'margins':>9}{'row':>9}{'cache':>9}  (max |Δ logit| vs steps)")
    for package in args.packages:
        pipe = ortspec.load(package, threads=args.threads, prefix_cache=False)
        state = DecoderState(pipe.target)
        prompts = [pipe.chat_prompt([{"role": "user", "content": c}]) for c in DEMO_CHATS[: args.prompts]]
        answers = {tuple(p): pipe.generate(p, max_new_tokens=args.new, use_draft=False).token_ids for p in prompts}
        worst = {"verify": 0.0, "chunk": 0.0, "row": 0.0, "cache": 0.0}
        for prompt in prompts:
            answer = answers[tuple(prompt)]
            logits = path_logits(state, prompt, answer)
            for path in ("verify", "chunk"):
                worst[path] = max(worst[path], float(np.abs(logits[path] - logits["steps"]).max()))
            row, cache = split(state, [*prompt, *answer], len(prompt) + 4)
            worst["row"], worst["cache"] = max(worst["row"], row), max(worst["cache"], cache)
        margins = path_noise(pipe, prompts, answers)
        print(
            f"{package!s:<40}{worst['verify']:>9.2g}{worst['chunk']:>9.2g}{margins:>9.2g}"
            f"{worst['row']:>9.2g}{worst['cache']:>9.2g}"
        )


if __name__ == "__main__":
    main()
