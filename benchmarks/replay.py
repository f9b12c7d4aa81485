"""A replay drafter: speculation on any model, random weights included, at a chosen acceptance rate α.

Random-weight models have no draft model that agrees with them, and real drafts accept at rates that
depend on the text. The replay proposer guesses the target's own greedy continuation (decoded once,
plainly) with each position corrupted at rate 1 - α (a fixed, seeded pattern), so every drafted
token is accepted with chance α given the ones before it were: the i.i.d. acceptance of the
speculative-decoding analyses. It separates what the kernels make of a round (t(n), auto γ) from
how well a drafter guesses. For benchmarks only: it knows the answer.

    python benchmarks/replay.py PACKAGE [--alpha 0.5 0.75 0.9] [--gamma auto 1 2 4] [--max-new-tokens 128]
        [--prompt-tokens 64] [--threads 2] [--clock cpu]

prints tokens/s of plain greedy decoding (timed again before each α's rows, so that a drift in load from
other jobs shows) and of speculation with the replay drafter at each α and γ, the acceptance seen, the γ
sent and the speedup. Outputs are checked equal to plain greedy decoding; on quantized kernels a
divergence at a near-tie (bench.NEAR_TIE) is reported on its row, any other stops the run. Where verify
calls resolve a near-tie unlike plain decoding, the replay guesses that row's own speculative output
(`settled_continuation`, untimed, run before each row: auto γ calibrates and learns the α there), the
target's choices as its verify calls make them; a row whose timed run still left it says so ("left").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import ortspec
from ortspec.runtime.bench import NEAR_TIE, divergence_gap
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.pipeline import Pipeline
from ortspec.runtime.results import GenerationResult
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.proposal import Proposal, Proposer

from common import load_average


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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def settled_continuation(
    pipe: Pipeline,
    prompt: list[int],
    continuation: list[int],
    alpha: float,
    seed: int,
    draft_tokens: int | str,
    rounds: int = 4,
) -> list[int]:
    """What the replay proposer should guess under `draft_tokens`: plain greedy's continuation, unless
    speculation's verify calls (many positions per call) resolve a near-tie the other way on quantized
    kernels; then speculation's own output, the target's greedy choices as those verify calls make them,
    until a speculative run reproduces it. Past such a divergence plain greedy's tokens are not the
    target's choices, and the replay would guess nothing right. (Untimed; auto γ also learns the α here.)"""
    for _ in range(rounds):
        proposer = ReplayProposer(prompt, continuation, alpha, pipe.target.vocab_size, seed)
        done = pipe.generate(prompt, proposer=proposer, max_new_tokens=len(continuation), draft_tokens=draft_tokens)
        if done.token_ids == continuation:
            break
        continuation = done.token_ids
    return continuation


def smallest_gap(pipe: Pipeline, prompt: list[int], continuation: list[int]) -> float:
    """The smallest gap between the two highest logits along `continuation` (scored in one call). Where it is
    below the path noise of quantized kernels, verify calls of different lengths may pick different tokens,
    and each γ would then be timed on a different text."""
    target = DecoderState(pipe.target)
    logits = target.forward([*prompt, *continuation[:-1]])[len(prompt) - 1 :]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def _rates(
    pipe: Pipeline, prompt: list[int], repeats: int, clock: Callable[[], float], **options
) -> tuple[list[float], GenerationResult]:
    """Tokens/s of `repeats` generations with `options`, and the last result."""
    rates = []
    for _ in range(repeats):
        start = clock()
        result = pipe.generate(prompt, **options)
        rates.append(len(result.token_ids) / (clock() - start))
    return rates, result


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{float(np.median(values)):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


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
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: this process's CPU time (use with --threads 1)"
    )
    args = parser.parse_args()
    pipe = ortspec.load(args.package, threads=args.threads, verify=False)
    new, clock = args.max_new_tokens, CLOCKS[args.clock]
    prompt = [int(t) for t in np.random.default_rng(args.seed).integers(0, pipe.target.vocab_size, args.prompt_tokens)]
    plain = pipe.generate(prompt, max_new_tokens=new, use_draft=False)
    gap = smallest_gap(pipe, prompt, plain.token_ids)
    print(f"smallest top-2 logit gap along plain greedy's continuation: {gap:.3f}")
    print(
        f"{args.package}: prompt {len(prompt)} tokens, {len(plain.token_ids)} new, "
        f"threads {args.threads or 'default'}, {args.clock} clock; load average {load_average()}"
    )
    print("speedup: median tokens/s over plain decoding's, timed before each α's rows; mean γ over drafted rounds")
    print(
        f"{'alpha':>6}{'gamma':>7}{'plain tok/s (range)':>20}{'tok/s':>9}{'speedup':>9}{'accepted':>10}"
        f"{'tok/call':>10}{'mean γ':>8}{'plain rounds':>14}"
    )
    for alpha in args.alpha:
        plain_rates, _ = _rates(pipe, prompt, args.repeats, clock, max_new_tokens=new, use_draft=False)
        for gamma in args.gamma:
            draft_tokens = gamma if gamma in ("auto", "adaptive") else int(gamma)
            truth = settled_continuation(pipe, prompt, plain.token_ids, alpha, args.seed, draft_tokens)
            replay = ReplayProposer(prompt, truth, alpha, pipe.target.vocab_size, args.seed)
            rates, result = _rates(
                pipe, prompt, args.repeats, clock, proposer=replay, max_new_tokens=new, draft_tokens=draft_tokens
            )
            left = result.stats.undrafted_rounds  # rounds with no guess: the sequence left the replayed text
            note = f"  left the replayed text ({left} rounds without a guess)" if left > 1 else ""
            if result.token_ids != plain.token_ids:  # quantized kernels: only a near-tie may tell them apart
                position, gap = divergence_gap(pipe, prompt, plain.token_ids, result.token_ids)
                if gap > NEAR_TIE:
                    raise SystemExit(f"alpha {alpha}, gamma {gamma}: output differs from plain greedy at {position}")
                note += f"  differs from plain greedy at token {position}, a near-tie (logit gap {gap:.3f})"
            stats = result.stats
            accepted = f"{stats.acceptance_rate:.2f}" if stats.acceptance_rate is not None else "-"
            sent = [d for d in stats.drafted_per_round if d]
            mean_gamma = f"{sum(sent) / len(sent):.1f}" if sent else "-"
            plain_rate = float(np.median(plain_rates))
            print(
                f"{alpha:>6.2f}{gamma:>7}{_spread(plain_rates, 1):>20}{float(np.median(rates)):>9.1f}"
                f"{float(np.median(rates)) / plain_rate:>9.2f}{accepted:>10}{stats.tokens_per_target_call:>10.2f}"
                f"{mean_gamma:>8}{stats.undrafted_rounds:>14}{note}",
                flush=True,
            )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
