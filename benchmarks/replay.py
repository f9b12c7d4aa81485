"""A replay drafter: speculation on any model, random weights included, at a chosen acceptance rate α.

Random-weight models have no draft model that agrees with them, and real drafts accept at rates that
depend on the text. The replay proposer guesses the target's own greedy continuation (decoded once,
plainly) with each position corrupted at rate 1 - α (a fixed, seeded pattern), so every drafted
token is accepted with chance α given the ones before it were: the i.i.d. acceptance of the
speculative-decoding analyses. It separates what the kernels make of a round (t(n), auto γ) from
how well a drafter guesses. For benchmarks only: it knows the answer.

    python benchmarks/replay.py PACKAGE [--alpha 0.5 0.75 0.9] [--gamma auto 1 2 4] [--max-new-tokens 128]
        [--prompt-tokens 64] [--threads 2]

prints tokens/s of plain greedy decoding and of speculation with the replay drafter at each α and γ,
the acceptance seen, and the speedup. Outputs are checked equal to plain greedy decoding.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import ortspec
from ortspec.runtime.pipeline import Pipeline
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.proposal import Proposal, Proposer


class ReplayProposer(Proposer):
    """Proposes `continuation` (the target's greedy tokens after `prompt`) with position i replaced by a
    different token where the seeded pattern says so (rate 1 - `alpha`). The pattern belongs to the
    positions, not to the rounds, so every γ policy meets the same corrupted positions. A committed
    sequence that leaves the continuation (sampling, a longer run) gets no proposals."""

    def __init__(
        self, prompt: Sequence[int], continuation: Sequence[int], alpha: float, vocab_size: int, seed: int = 0
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if vocab_size < 2:
            raise ValueError(f"a vocabulary of {vocab_size} token(s) has no token to corrupt to")
        rng = np.random.default_rng(seed)
        truth = np.asarray(continuation, dtype=np.int64)
        corrupted = rng.random(len(truth)) >= alpha
        wrong = (truth + rng.integers(1, vocab_size, len(truth))) % vocab_size  # never the true token
        self.prompt = [int(t) for t in prompt]
        self.truth = [int(t) for t in truth]
        self.guesses = [int(t) for t in np.where(corrupted, wrong, truth)]

    def propose(self, tokens: Sequence[int], count: int, chooser: TokenChooser) -> Proposal:
        start = len(tokens) - len(self.prompt)
        if (
            start < 0
            or list(tokens[: len(self.prompt)]) != self.prompt
            or list(tokens[len(self.prompt) :]) != self.truth[:start]
        ):
            return Proposal([])
        return Proposal(self.guesses[start : start + count], source="replay")


def replay_proposer(
    pipe: Pipeline, prompt: Sequence[int], max_new_tokens: int, alpha: float, seed: int = 0
) -> ReplayProposer:
    """A `ReplayProposer` for `prompt` on `pipe`'s target, its continuation decoded once by plain greedy decoding."""
    plain = pipe.generate(list(prompt), max_new_tokens=max_new_tokens, use_draft=False)
    return ReplayProposer(prompt, plain.token_ids, alpha, pipe.target.vocab_size, seed)


def _tokens_per_second(pipe: Pipeline, prompt: list[int], repeats: int, **options) -> tuple[float, object]:
    """Median tokens/s of `repeats` generations (after one warm-up) and the last result."""
    result = pipe.generate(prompt, **options)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = pipe.generate(prompt, **options)
        rates.append(len(result.token_ids) / (time.perf_counter() - start))
    return float(np.median(rates)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--gamma", nargs="+", default=["auto", "1", "2", "4"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = ortspec.load(args.package, threads=args.threads, verify=False)
    prompt = [int(t) for t in np.random.default_rng(args.seed).integers(0, pipe.target.vocab_size, args.prompt_tokens)]
    new = args.max_new_tokens
    plain_rate, plain = _tokens_per_second(pipe, prompt, args.repeats, max_new_tokens=new, use_draft=False)
    print(
        f"{args.package}: prompt {len(prompt)} tokens, {len(plain.token_ids)} new, threads {args.threads or 'default'}"
    )
    print(f"plain greedy: {plain_rate:.1f} tokens/s (median of {args.repeats})")
    print(f"{'alpha':>6}{'gamma':>7}{'tok/s':>9}{'speedup':>9}{'accepted':>10}{'tok/call':>10}")
    for alpha in args.alpha:
        replay = ReplayProposer(prompt, plain.token_ids, alpha, pipe.target.vocab_size, args.seed)
        for gamma in args.gamma:
            draft_tokens = gamma if gamma in ("auto", "adaptive") else int(gamma)
            rate, result = _tokens_per_second(
                pipe, prompt, args.repeats, proposer=replay, max_new_tokens=new, draft_tokens=draft_tokens
            )
            if result.token_ids != plain.token_ids:
                raise SystemExit(f"alpha {alpha}, gamma {gamma}: speculative output differs from plain greedy")
            stats = result.stats
            accepted = f"{stats.acceptance_rate:.2f}" if stats.acceptance_rate is not None else "-"
            print(
                f"{alpha:>6.2f}{gamma:>7}{rate:>9.1f}{rate / plain_rate:>9.2f}{accepted:>10}"
                f"{stats.tokens_per_target_call:>10.2f}"
            )


if __name__ == "__main__":
    main()
