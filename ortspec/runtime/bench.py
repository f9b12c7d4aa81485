"""Plain vs speculative decoding on the same prompts, measured alternately in one run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.pipeline import Pipeline
from ortspec.runtime.results import GenerationResult
from ortspec.runtime.text.tokenizer import TextTokenizer


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


END = -1  # the token of an output that had ended


@dataclass(frozen=True)
class Divergence:
    """Where a speculative output first left the plain one, and how close the target's choice was there.

    `gap` is logit(plain token) - logit(speculative token) in plain decoding's own logits at `position`
    (replayed: the prompt in one call, then one token per call): how far from a tie the reference was.
    """

    prompt: int  # index of the prompt
    position: int  # index of the first differing new token
    plain_token: int  # END where that output ended there
    speculative_token: int
    gap: float  # inf where one output ended where the other went on

    def describe(self, tokenizer: TextTokenizer | None = None) -> str:
        """One line: where, which two tokens, and the gap."""

        def show(token: int) -> str:
            if token == END:
                return "(end)"
            return f"{tokenizer.decode([token])!r} ({token})" if tokenizer is not None else str(token)

        return (
            f"prompt {self.prompt}, new token {self.position}: plain {show(self.plain_token)} vs speculative "
            f"{show(self.speculative_token)}, logit gap {self.gap:.4f} in plain decoding's own logits"
        )


@dataclass
class BenchReport:
    """Plain and speculative totals, and every divergence of the outputs with its logit gap.

    A divergence is a near-tie when its gap is at most `near_tie` (by default the measured `path_noise`:
    how far the one- and many-position kernels move the target's top-2 margin); beyond it, a mismatch: a bug.
    """

    plain: ModeTotals = field(default_factory=ModeTotals)
    speculative: ModeTotals = field(default_factory=ModeTotals)
    prompts: int = 0
    runs: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    near_tie: float = 0.0  # the largest gap counted as a near-tie
    path_noise: float | None = None  # what near_tie came from, when measured (only where outputs diverged)

    @property
    def near_ties(self) -> list[Divergence]:
        return [d for d in self.divergences if 0 <= d.gap <= self.near_tie]

    @property
    def mismatches(self) -> list[Divergence]:
        """Divergences beyond a near-tie (or where plain decoding's replay did not pick its own token): bugs."""
        return [d for d in self.divergences if not 0 <= d.gap <= self.near_tie]

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

    Every generation starts from an empty target cache (no prefix reuse): both modes then prefill the
    prompt alike, and plain decoding can be replayed to read its own logits where an output diverged.
    A divergence whose gap there is at most `near_tie` counts as a near-tie; by default `near_tie` is the
    path noise measured on these prompts, once some output diverged.
    """
    if near_tie is not None:
        check_near_tie(near_tie)
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
    plain = ModeTotals()
    reports = {name: BenchReport(plain=plain, prompts=len(prompts)) for name in modes}
    answers: dict[int, list[int]] = {}  # a plain answer per prompt, for the path noise
    with fresh_prefills(pipe):
        if warmup:
            for name in names:
                run(name, 0)
        for repeat in range(repeats):
            for index in range(len(prompts)):
                shift = (repeat + index) % len(names)
                results = {name: run(name, index) for name in names[shift:] + names[:shift]}
                plain.add(results["plain"])
                plain_ids = answers[index] = results["plain"].token_ids
                for name, report in reports.items():
                    report.speculative.add(results[name])
                    report.runs += 1
                    if results[name].token_ids != plain_ids:
                        report.divergences.append(divergence(pipe, prompts, index, plain_ids, results[name].token_ids))
    if near_tie is None and any(report.divergences for report in reports.values()):
        ids = [prompt_ids(pipe, p) for p in prompts]
        noise = path_noise(pipe, ids, {tuple(ids[i]): answer for i, answer in answers.items()})
        for report in reports.values():
            report.path_noise = noise
        near_tie = near_tie_for(noise)
    for report in reports.values():
        report.near_tie = near_tie or 0.0
    return reports


# Quantized CPU kernels with int8 compute (MatMulNBits, accuracy level 4) amplify last-bit differences:
# GroupQueryAttention rounds one query position differently from several, and the int8 quantization of
# the activations turns that ~1e-7 into whole quantization steps, layer after layer. A sequence whose
# cache was filled in chunks (speculative verification, a prefill) then differs from one filled token by
# token: measured up to ~0.02 in a logit on the default int4 pair and up to 1.4 (top-2 margins: 0.53) on
# SmolLM2-135M int4. Where two candidates are closer than that, either path may pick either.
NEAR_TIE = 0.05  # a fixed bound for callers that measure no path noise (the default pair's tests)
MAX_NEAR_TIE = 1.0  # a larger "noise" means a broken kernel path: widening near-ties further would hide bugs


def check_near_tie(near_tie: float) -> None:
    if not 0 <= near_tie <= MAX_NEAR_TIE:
        raise ValueError(
            f"near_tie={near_tie} would excuse real mismatches: at most {MAX_NEAR_TIE} (the gap one- and "
            "many-position kernels may move a logit margin; a larger measured gap means a broken kernel path)"
        )


@contextmanager
def fresh_prefills(pipe: Pipeline) -> Iterator[None]:
    """Generations hand the target an empty cache meanwhile: each prefills its whole prompt in one call,
    as `plain_logits` replays it (a reused prefix would leave only the prompt's last token to a call of its
    own, and that token's logits, on quantized kernels, differ from a whole prompt's last row)."""
    pool = pipe.target_states
    reuse, pool.reuse = pool.reuse, False
    try:
        yield
    finally:
        pool.reuse = reuse


def prompt_ids(pipe: Pipeline, prompt: str | Sequence[int]) -> list[int]:
    return pipe.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def plain_logits(pipe: Pipeline, prompt: Sequence[int], answer: Sequence[int], position: int) -> np.ndarray:
    """The logits plain decoding chose `answer[position]` from, from an empty cache: the prompt in one
    call, then one token per call, as it ran."""
    with pipe.target_states.state() as target:
        logits: np.ndarray = target.forward(prompt, last_only=True)[-1]
        for token in answer[:position]:
            logits = target.forward([token])[-1]
    return logits


def divergence(
    pipe: Pipeline,
    prompts: Sequence[str | Sequence[int]],
    index: int,
    plain_ids: Sequence[int],
    spec_ids: Sequence[int],
) -> Divergence:
    """The first position where `spec_ids` leaves `plain_ids`, with the gap in plain decoding's own logits."""
    position = next(
        (i for i, (a, b) in enumerate(zip(plain_ids, spec_ids, strict=False)) if a != b),
        min(len(plain_ids), len(spec_ids)),
    )
    if position >= min(len(plain_ids), len(spec_ids)):  # one stopped where the other went on: not a tie
        plain_token, spec_token = (list(ids[position : position + 1]) or [END] for ids in (plain_ids, spec_ids))
        return Divergence(index, position, plain_token[0], spec_token[0], float("inf"))
    logits = plain_logits(pipe, prompt_ids(pipe, prompts[index]), plain_ids, position)
    a, b = plain_ids[position], spec_ids[position]
    return Divergence(index, position, a, b, float(logits[a] - logits[b]))


def divergence_gap(
    pipe: Pipeline, prompt: str | Sequence[int], plain_ids: Sequence[int], spec_ids: Sequence[int]
) -> tuple[int, float]:
    """(first differing position, logit gap there in plain decoding's own logits, replayed from an empty
    cache: a plain run that reused a cached prefix of its prompt may have seen other logits)."""
    found = divergence(pipe, [prompt], 0, plain_ids, spec_ids)
    return found.position, found.gap


def path_logits(
    target: DecoderState, prompt: Sequence[int], answer: Sequence[int], verify: int = 4
) -> dict[str, np.ndarray]:
    """The logits that chose each token of `answer`, through three cuts of the sequence into calls:
    "steps" (plain decoding: the prompt in one call, then one token per call), "verify" (calls of `verify`
    positions: speculative rounds that accept every draft) and "chunk" (one call). Resets `target`."""
    target.reset()
    steps = [target.forward(prompt, last_only=True)[-1], *(target.forward([t])[-1] for t in answer[:-1])]
    target.reset()
    rounds = [target.forward(prompt, last_only=True)[-1:]]
    rounds += [target.forward(answer[i : i + verify]) for i in range(0, len(answer) - 1, verify)]
    target.reset()
    chunk = target.forward([*prompt, *answer[:-1]])[len(prompt) - 1 :]
    return {"steps": np.array(steps), "verify": np.concatenate(rounds)[: len(answer)], "chunk": chunk}


def path_noise(pipe: Pipeline, prompts: list[list[int]], answers: dict[tuple[int, ...], list[int]]) -> float:
    """Largest change of the top-2 logit margin along the plain answers between the one-position kernels
    (token by token, as plain decoding runs) and the many-position ones (verify calls, one chunk)."""
    target, worst = DecoderState(pipe.target), 0.0
    for prompt in prompts:
        answer = answers.get(tuple(prompt))
        if not answer:
            continue
        logits = path_logits(target, prompt, answer)
        rows = np.arange(len(answer))
        second, first = np.argsort(logits["steps"], axis=-1)[:, -2:].T
        for many in (logits["verify"], logits["chunk"]):
            margins = (logits["steps"][rows, first] - logits["steps"][rows, second]) - (
                many[rows, first] - many[rows, second]
            )
            worst = max(worst, float(np.abs(margins).max()))
    return worst


def near_tie_for(noise: float) -> float:
    """The logit gap up to which a divergence counts as a near-tie: the measured path noise, at most
    MAX_NEAR_TIE (a larger "noise" means a broken kernel path: widening near-ties further would hide bugs)."""
    return min(noise, MAX_NEAR_TIE)
