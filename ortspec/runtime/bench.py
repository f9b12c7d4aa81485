"""Plain vs speculative decoding on the same prompts, measured alternately in one run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.pipeline import Pipeline
from ortspec.runtime.results import GenerationResult


@dataclass
class ModeTotals:
    """Sums over every measured generation of one mode."""

    new_tokens: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0  # after the first token: prefill excluded
    rounds_with_rejection: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    undrafted_rounds: int = 0  # rounds without drafts although drafting was on (auto γ = 0)

    def add(self, result: GenerationResult) -> None:
        s = result.stats
        self.undrafted_rounds += s.undrafted_rounds
        self.new_tokens += s.new_tokens
        self.seconds += s.seconds
        self.decode_seconds += s.seconds - s.time_to_first_token
        self.rounds_with_rejection += sum(k < n for k, n in zip(s.accepted_per_round, s.drafted_per_round, strict=True))
        self.target_calls += s.target_calls
        self.draft_calls += s.draft_calls
        self.drafted += s.drafted_tokens
        self.accepted += s.accepted_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def alpha(self) -> float | None:
        """Per-draft acceptance under the geometric model: accepted / (accepted + rejections);
        drafts after a round's first rejection were never judged, so they do not count."""
        judged = self.accepted + self.rounds_with_rejection
        return self.accepted / judged if judged else None


@dataclass
class BenchReport:
    """Plain and speculative totals, and whether every pair of outputs was identical."""

    plain: ModeTotals = field(default_factory=ModeTotals)
    speculative: ModeTotals = field(default_factory=ModeTotals)
    prompts: int = 0
    runs: int = 0
    mismatches: list[int] = field(default_factory=list)  # prompts whose outputs differed beyond a near-tie: bugs
    near_ties: list[tuple[int, int, float]] = field(default_factory=list)  # (prompt, position, logit gap)

    @property
    def speedup(self) -> float:
        plain = self.plain.tokens_per_second
        return self.speculative.tokens_per_second / plain if plain else 0.0

    @property
    def decode_speedup(self) -> float:
        """Speedup of the decoding phase alone (after the first token; the prefill is the same for both)."""
        if not self.plain.decode_seconds or not self.speculative.decode_seconds:
            return 0.0
        plain = (self.plain.new_tokens - self.runs) / self.plain.decode_seconds
        return (self.speculative.new_tokens - self.runs) / self.speculative.decode_seconds / plain

    @property
    def tokens_per_target_call(self) -> float:
        """Speculative new tokens per verify call (prefill calls excluded)."""
        verify_calls = self.speculative.target_calls - self.runs
        return (self.speculative.new_tokens - self.runs) / verify_calls if verify_calls else 0.0


def compare(
    pipe: Pipeline,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    repeats: int = 3,
    warmup: bool = True,
    near_tie: float | None = None,
    **draft_options: Any,
) -> BenchReport:
    """Run every prompt plain and speculative (greedy), alternating which goes first, `repeats` times.

    `draft_options` go to the speculative runs: draft ("hybrid"/"model"/"ngram"/"suffix"), draft_tokens,
    draft_min_prob...; `near_tie` as in `compare_modes`.
    """
    modes = {"speculative": draft_options}
    reports = compare_modes(
        pipe, prompts, modes, max_new_tokens=max_new_tokens, repeats=repeats, warmup=warmup, near_tie=near_tie
    )
    return reports["speculative"]


def compare_modes(
    pipe: Pipeline,
    prompts: Sequence[str | Sequence[int]],
    modes: dict[str, dict[str, Any]],
    *,
    max_new_tokens: int = 64,
    repeats: int = 3,
    warmup: bool = True,
    before_run: Callable[[str, int], None] | None = None,
    near_tie: float | None = None,
) -> dict[str, BenchReport]:
    """Plain decoding and each speculative mode (its generate options) on every prompt, greedy, `repeats`
    times; the order of the runs rotates from prompt to prompt, so that load on a shared machine hits
    every mode alike. Every report holds the same plain totals. `before_run(mode, prompt index)` is
    called before each run ("plain" for plain decoding), e.g. to set up what a drafter remembers.
    Divergences whose logit gap is below `near_tie` (default NEAR_TIE) count as near-ties, not bugs.
    """
    near_tie = NEAR_TIE if near_tie is None else near_tie
    if not 0 <= near_tie <= MAX_NEAR_TIE:
        raise ValueError(
            f"near_tie={near_tie} would excuse real mismatches: at most {MAX_NEAR_TIE} (the gap one- and "
            "many-position kernels may move a logit margin; a larger measured gap means a broken kernel path)"
        )
    if not prompts:
        raise ValueError("no prompts to benchmark")
    if pipe.draft is None and any(options.get("draft") == "model" for options in modes.values()):
        raise ValueError("the package has no draft model: benchmark draft='suffix' or draft='ngram'")

    def run(mode: str, index: int) -> GenerationResult:
        if before_run is not None:
            before_run(mode, index)
        options = modes.get(mode, {"use_draft": False})
        return pipe.generate(prompts[index], max_new_tokens=max_new_tokens, **options)

    names = ["plain", *modes]
    if warmup:
        for name in names:
            run(name, 0)
    plain = ModeTotals()
    reports = {name: BenchReport(plain=plain, prompts=len(prompts)) for name in modes}
    for repeat in range(repeats):
        for index, prompt in enumerate(prompts):
            shift = (repeat + index) % len(names)
            results = {name: run(name, index) for name in names[shift:] + names[:shift]}
            plain.add(results["plain"])
            plain_ids = results["plain"].token_ids
            for name, report in reports.items():
                report.speculative.add(results[name])
                report.runs += 1
                spec_ids = results[name].token_ids
                if plain_ids != spec_ids:
                    position, gap = divergence_gap(pipe, prompt, plain_ids, spec_ids)
                    if gap < near_tie:
                        report.near_ties.append((index, position, gap))
                    elif index not in report.mismatches:
                        report.mismatches.append(index)
    return reports


# Quantized CPU kernels (MatMulNBits with int8 compute) take different code paths for one position
# and for several, so a sequence whose cache was filled in chunks (speculative verification, or a
# prefill) differs from one filled token by token in the last bits: measured up to ~0.02 in a logit
# on the default int4 pair. Where two candidate tokens are closer than that, either path may pick
# either. Divergences below this gap are reported as near-ties; anything above is a bug.
NEAR_TIE = 0.05
MAX_NEAR_TIE = 1.0  # int4 kernel paths were measured to move SmolLM2's top-2 margins by up to ~0.9


def divergence_gap(
    pipe: Pipeline, prompt: str | Sequence[int], plain_ids: Sequence[int], spec_ids: Sequence[int]
) -> tuple[int, float]:
    """(first differing position, |logit gap| there between the two choices), from a fresh prefill."""
    position = next(
        (i for i, (a, b) in enumerate(zip(plain_ids, spec_ids, strict=False)) if a != b),
        min(len(plain_ids), len(spec_ids)),
    )
    if position >= min(len(plain_ids), len(spec_ids)):
        return position, float("inf")  # one stopped early (eos) where the other went on: not a tie
    prompt_ids = pipe.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    with pipe.target_states.state() as target:
        logits = target.forward([*prompt_ids, *plain_ids[:position]], last_only=True)[-1]
    return position, float(abs(logits[plain_ids[position]] - logits[spec_ids[position]]))


def path_noise(pipe: Pipeline, prompts: list[list[int]], answers: dict[tuple[int, ...], list[int]]) -> float:
    """Largest change of the top-2 logit margin along the plain answers between the one-position
    kernels (token by token, as plain decoding runs) and the many-position ones (one chunk)."""
    target, worst = DecoderState(pipe.target), 0.0
    for prompt in prompts:
        answer = answers[tuple(prompt)]
        target.reset()
        chunk = target.forward([*prompt, *answer])[len(prompt) - 1 : -1]
        target.reset()
        steps = [target.forward(prompt)[-1], *(target.forward([token])[-1] for token in answer[:-1])]
        for single, many in zip(steps, chunk, strict=True):
            second, first = np.argsort(single)[-2:]
            worst = max(worst, abs((single[first] - single[second]) - (many[first] - many[second])))
    return float(worst)


def near_tie_for(noise: float) -> float:
    """The logit gap under which a divergence counts as a near-tie: the measured path noise, within bounds
    (a larger "noise" means a broken kernel path: widening near-ties further would hide bugs)."""
    return max(min(noise, MAX_NEAR_TIE), NEAR_TIE)
