"""`ortspec bench`, `ortspec eval` and `ortspec calibrate`: what a package costs and gains on this machine."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ortspec.runtime.options import DrafterKind, GenerationConfig

from .options import PACKAGE, generation_options, load_pipeline, runtime_options
from .output import quantization_label

# the generation options of `bench` (greedy by design: it checks that both modes give the same tokens)
BENCH_OPTIONS = ("max_new_tokens", "draft", "draft_tokens", "draft_tokens_max", "draft_min_prob", "max_ngram_size")


@click.command()
@click.argument("package", type=PACKAGE)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help='One prompt per line, or .jsonl with a JSON string or {"prompt": ...} per line (with --chat, also '
    '{"messages": [...]}: a chat log, answered at its last user message).',
)
@click.option(
    "--chat",
    is_flag=True,
    help="Send each prompt as a user message through the package's chat template, as `ortspec chat` does "
    "(what an instruction-tuned model serves); default: the prompts as raw text.",
)
@generation_options(*BENCH_OPTIONS, max_new_tokens=64)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the prompts.")
@runtime_options
def bench(
    package: str,
    prompts_file: Path,
    chat: bool,
    repeats: int,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> None:
    """Plain vs speculative decoding of PACKAGE on the prompts, measured alternately in one run.

    Prints the acceptance rate α, tokens per target call, tokens/s of both modes and the speedup,
    and checks that both modes produced identical tokens. Where they did not, it prints the first
    differing token and the logit gap between the two choices in plain decoding's own logits: a gap
    within the measured difference of one- and many-position kernels (int8/int4) is a near-tie,
    anything beyond it fails as a bug. Every run starts from an empty cache (no prefix reuse), so
    that plain decoding can be replayed. The drafting options apply to the speculative runs; suffix
    drafting's pool keeps the outputs of earlier runs, so repeats draft from a prompt's earlier answers.
    """
    from ortspec.runtime.bench import compare
    from ortspec.runtime.text.prompt_files import read_prompts, read_requests

    pipe = load_pipeline(package, runtime)
    prompts: Sequence[str | list[int]]
    if chat:
        prompts = [pipe.chat_prompt(messages) for messages in read_requests(prompts_file)]
    else:
        prompts = read_prompts(prompts_file)
    report = compare(pipe, prompts, repeats=repeats, **options)
    spec, plain = report.speculative, report.plain
    alpha = "n/a" if spec.acceptance_rate is None else f"{spec.acceptance_rate:.3f}"
    drafter = pipe.drafter(GenerationConfig.from_options(options))
    click.echo(
        f"{report.prompts} prompts x {repeats} repeats, max_new_tokens={options['max_new_tokens']}, "
        f"drafter {drafter}, γ={options['draft_tokens']}, greedy"
    )
    click.echo(f"{'mode':<12}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'target calls':>14}{'draft calls':>13}")
    for name, totals in (("plain", plain), ("speculative", spec)):
        click.echo(
            f"{name:<12}{totals.new_tokens:>8}{totals.seconds:>10.3f}{totals.tokens_per_second:>10.1f}"
            f"{totals.target_calls:>14}{totals.draft_calls:>13}"
        )
    geometric = "n/a" if spec.alpha is None else f"{spec.alpha:.3f}"
    click.echo(
        f"acceptance rate = {alpha} of drafts (α per judged draft = {geometric}); "
        f"tokens per target call = {report.tokens_per_target_call:.2f}"
    )
    click.echo(
        f"speedup (speculative / plain tokens/s) = {report.speedup:.2f}x end to end, "
        f"{report.decode_speedup:.2f}x after the first token"
    )
    if not report.divergences:
        click.echo("outputs identical: yes (every prompt, every repeat)")
        return
    noise = "" if report.path_noise is None else f" (the path noise measured on these prompts: {report.path_noise:.4f})"
    bound = f"near-tie bound {report.near_tie:.4f}{noise}"
    for found, runs in Counter(report.divergences).items():  # repeats diverge alike: one line each
        kind = "near-tie" if found in report.near_ties else "MISMATCH"
        click.echo(f"{kind} ({runs} run{'s' * (runs > 1)}): {found.describe(pipe.tokenizer)}")
    if report.mismatches:
        raise click.ClickException(
            f"{len(report.mismatches)} of {report.runs} speculative outputs left plain decoding beyond a near-tie "
            f"({bound}): a bug"
        )
    click.echo(
        f"outputs identical on {report.runs - len(report.divergences)} of {report.runs} runs; the others left plain "
        f"decoding where its two choices were within the {bound}: one- and many-position quantized kernels "
        "differ in the last bits, so either path may pick either"
    )


@click.command("eval")
@click.argument("package", type=PACKAGE)
@click.option(
    "--text",
    "text_path",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="UTF-8 text to score, ideally like what you will serve (held out from any training).",
)
@click.option(
    "--reference",
    type=PACKAGE,
    help="A package of the same model to compare with, e.g. its `--quantize none` export: "
    "top-1 agreement and mean KL(reference || package).",
)
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option(
    "--max-tokens", type=click.IntRange(min=2), default=8192, show_default=True, help="Score at most this many."
)
@runtime_options
def evaluate_package(
    package: str,
    text_path: str,
    reference: str | None,
    window: int,
    max_tokens: int,
    runtime: dict[str, Any],
) -> None:
    """How much PACKAGE's quantization costs in quality, measured on a text (torch-free).

    Prints the perplexity of PACKAGE's target on the text and, with --reference, the perplexity of
    the reference, how often the two agree on the most likely next token, and the mean KL divergence
    of their next-token distributions. The text is read in windows of --window tokens, each from
    scratch. Compare int8 and int4 exports against the fp32 one to choose --quantize.
    """
    from ortspec.runtime.evaluate import evaluate, special_prefix, windows

    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{text_path} is not UTF-8 text") from exc
    pipe = load_pipeline(package, runtime)
    ref = load_pipeline(reference, runtime) if reference else None
    tokens = pipe.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if ref is not None and ref.tokenizer.encode(text, add_special_tokens=False)[:max_tokens] != tokens:
        raise ValueError(f"{reference} tokenizes the text differently: compare packages of the same model")
    window = min(window, pipe.target.max_length, ref.target.max_length if ref else window)
    pieces = windows(tokens, window, special_prefix(pipe.tokenizer))
    total = sum(len(p) - 1 for p in pieces)
    with click.progressbar(length=total, label="scoring", file=sys.stderr) as bar:
        report = evaluate(pipe.target, pieces, ref.target if ref else None, on_window=bar.update)
    click.echo(f"package     {package} ({quantization_label(pipe.manifest)})")
    click.echo(f"text        {text_path}: {report.tokens:,} positions scored in {len(pieces)} windows of ≤ {window}")
    line = f"perplexity  {report.perplexity:.3f}"
    if ref is not None and report.reference_perplexity is not None:
        change = report.perplexity / report.reference_perplexity - 1
        line += f" (reference {report.reference_perplexity:.3f}, {change:+.1%}; {quantization_label(ref.manifest)})"
    click.echo(line)
    if report.top1_agreement is not None and report.mean_kl is not None:
        click.echo(f"top-1 agreement with the reference  {report.top1_agreement:.1%}")
        click.echo(f"mean KL(reference || package)       {report.mean_kl:.4f} nats per position")
    click.echo(f"({report.seconds:.1f} s)")


@click.command()
@click.argument("package", type=PACKAGE)
@click.option("--max-gamma", type=click.IntRange(1, 16), default=8, show_default=True)
@runtime_options
def calibrate(
    package: str,
    max_gamma: int,
    runtime: dict[str, Any],
) -> None:
    """Measure PACKAGE's step costs on this machine (stored beside its manifest, or in the user cache
    if the package cannot take them) and show what they imply.

    At a few context lengths: the target's call time t(n) for n = 1..max-gamma+1 new positions, the
    draft's step time d, and the time r(γ) of a whole round (γ draft steps, then one verify call of
    γ+1 positions) run back to back as generation runs it. Then the best γ, the predicted speedup
    for some acceptance rates α, and the α below which drafting does not pay. `--draft-tokens auto`
    (the default) uses these, measuring them on first use if this was never run.
    """
    pipe = load_pipeline(package, runtime)
    calibration = pipe.calibration(remeasure=True, max_gamma=max_gamma)
    click.echo(f"calibration for {calibration.key}")
    click.echo(f"{'context':>8}{'':>6}" + "".join(f"{n:>8}" for n in range(1, max_gamma + 2)))
    for i, context in enumerate(calibration.contexts):
        click.echo(f"{context:>8}{'t(n)':>6}" + "".join(f"{t:>8.2f}" for t in calibration.target_ms[i]))
        if calibration.round_ms:
            click.echo(f"{'':>8}{'r(γ)':>6}" + "".join(f"{t:>8.2f}" for t in calibration.round_ms[i]))
            click.echo(f"{'':>8}{'d':>6}{calibration.draft_ms[i]:>8.2f}")
    click.echo("(ms; t(n): target call adding n positions; r(γ): γ draft steps + verify of γ+1; d: a draft step)")
    has_draft = pipe.draft is not None
    drafter = (
        f"{DrafterKind.MODEL}"
        if has_draft
        else f"{DrafterKind.SUFFIX} or {DrafterKind.NGRAM} (no draft model: drafts cost nothing)"
    )
    for context in calibration.contexts:
        needed = calibration.alpha_needed(context, has_draft)
        predictions = []
        for alpha in (0.5, 0.7, 0.8, 0.9):
            gamma = calibration.best_gamma(alpha, context, has_draft)
            speedup = calibration.predicted_speedup(alpha, gamma, context, has_draft) if gamma else 1.0
            predictions.append(f"α={alpha:.1f}: γ={gamma} {speedup:.2f}x")
        pays = "never pays here" if needed is None else f"pays from α ≥ {needed:.2f}"
        click.echo(f"context {context}, drafter {drafter}: drafting {pays}; best " + ", ".join(predictions))
    if pipe.calibration_file is None:  # where it went, or why nowhere, went to stderr as it happened
        raise click.ClickException("the calibration could not be stored in the package or the user cache")
