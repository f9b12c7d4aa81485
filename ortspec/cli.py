"""The `ortspec` command line: export a pair, generate with it, benchmark it, inspect it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .runtime.decoder import ContextLengthError
from .runtime.manifest import Manifest, PackageError, load_manifest

QUANT_CHOICES = click.Choice(["none", "int8", "int4"])


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad package, bad input) into one-line errors instead of tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (PackageError, ContextLengthError, ValueError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _runtime_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--provider / --threads / --no-verify, shared by the commands that load a package."""
    func = click.option(
        "--provider",
        "providers",
        multiple=True,
        help="ONNX Runtime execution provider, in priority order (repeatable). Default: CPUExecutionProvider.",
    )(func)
    func = click.option(
        "--max-length",
        type=click.IntRange(min=1),
        help="Longest prompt + generation to hold (default: the model's maximum, at most 4096).",
    )(func)
    func = click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per session (default: ORT's).")(
        func
    )
    func = click.option(
        "--no-verify", is_flag=True, help="Skip the sha256 check of the package files (sizes are still checked)."
    )(func)
    return func


def _load(
    package: str, providers: tuple[str, ...], threads: int | None, max_length: int | None, no_verify: bool
) -> Any:
    from .runtime.pipeline import load

    return load(package, providers=providers or None, threads=threads, max_length=max_length, verify=not no_verify)


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
@click.option("--draft", help="Draft checkpoint (local directory or hub id); must share the target's tokenizer.")
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
    help="builder: ONNX built from safetensors with GroupQueryAttention and a shared KV buffer (llama, "
    "mistral, qwen2, qwen3, phi3, gemma, gemma2; no torch needed); optimum: the generic exporter; "
    "auto: the builder when it applies.",
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

    TARGET and --draft are Hugging Face checkpoint directories or hub ids (hub ids need a network
    or a filled Hugging Face cache). The package appears only once complete: an interrupted export
    leaves no half-written package behind.
    """
    try:
        from .export import export_pair
    except ImportError as exc:
        raise click.ClickException(
            f"`ortspec export` needs the export extras ({exc.name} is missing): pip install 'ortspec[export]'"
        ) from exc
    out = out or Path(f"{Path(target.rstrip('/')).name}-ortspec")
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


def _print_stats(stats: Any) -> None:
    alpha = "n/a (no drafts)" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.1%}"
    click.echo(
        f"\n--\n{stats.new_tokens} tokens in {stats.seconds:.3f} s: {stats.tokens_per_second:.1f} tokens/s "
        f"(first token after {stats.time_to_first_token * 1000:.1f} ms, finished on {stats.finish_reason})\n"
        f"acceptance {alpha} of {stats.drafted_tokens} drafts (γ={stats.draft_tokens}); "
        f"{stats.tokens_per_target_call:.2f} tokens per target call; "
        f"target calls {stats.target_calls}, draft calls {stats.draft_calls}",
        err=True,
    )


def _parse_token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter("with --token-ids the prompt must be integers separated by spaces or commas") from exc


@main.command()
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--draft-tokens",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="γ: tokens the draft proposes per target call.",
)
@click.option("--no-draft", is_flag=True, help="Plain decoding with the target alone.")
@click.option("--token-ids", is_flag=True, help="PROMPT is a list of token ids, used as-is.")
@click.option("--stats", is_flag=True, help="Print acceptance, tokens/s and call counts (to stderr).")
@_runtime_options
@_user_errors
def generate(
    package: str,
    prompt: str,
    max_new_tokens: int,
    draft_tokens: int,
    no_draft: bool,
    token_ids: bool,
    stats: bool,
    providers: tuple[str, ...],
    threads: int | None,
    max_length: int | None,
    no_verify: bool,
) -> None:
    """Complete PROMPT with the model in PACKAGE, streaming the text as tokens are accepted.

    Decoding is greedy; with the package's draft it is speculative and gives exactly the target's
    own greedy output, only faster.
    """
    pipe = _load(package, providers, threads, max_length, no_verify)
    prompt_in = _parse_token_ids(prompt) if token_ids else prompt
    stream = pipe.stream(prompt_in, max_new_tokens=max_new_tokens, use_draft=not no_draft, draft_tokens=draft_tokens)
    for delta in stream:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats and stream.result is not None:
        _print_stats(stream.result.stats)


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
    "--draft-tokens", type=click.IntRange(min=1), default=4, show_default=True, help="γ for the speculative runs."
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the prompts.")
@_runtime_options
@_user_errors
def bench(
    package: str,
    prompts_file: Path,
    max_new_tokens: int,
    draft_tokens: int,
    repeats: int,
    providers: tuple[str, ...],
    threads: int | None,
    max_length: int | None,
    no_verify: bool,
) -> None:
    """Plain vs speculative decoding of PACKAGE on the prompts, measured alternately in one run.

    Prints the acceptance rate α, tokens per target call, tokens/s of both modes and the speedup,
    and checks that both modes produced identical tokens.
    """
    from .runtime.bench import compare

    prompts = read_prompts(prompts_file)
    pipe = _load(package, providers, threads, max_length, no_verify)
    report = compare(pipe, prompts, max_new_tokens=max_new_tokens, draft_tokens=draft_tokens, repeats=repeats)
    spec, plain = report.speculative, report.plain
    alpha = "n/a" if spec.acceptance_rate is None else f"{spec.acceptance_rate:.3f}"
    click.echo(f"{report.prompts} prompts x {repeats} repeats, max_new_tokens={max_new_tokens}, γ={draft_tokens}")
    click.echo(f"{'mode':<12}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'target calls':>14}{'draft calls':>13}")
    for name, totals in (("plain", plain), ("speculative", spec)):
        click.echo(
            f"{name:<12}{totals.new_tokens:>8}{totals.seconds:>10.3f}{totals.tokens_per_second:>10.1f}"
            f"{totals.target_calls:>14}{totals.draft_calls:>13}"
        )
    click.echo(f"acceptance rate α = {alpha}; tokens per target call = {report.tokens_per_target_call:.2f}")
    click.echo(f"speedup (speculative / plain tokens/s) = {report.speedup:.2f}x")
    if report.mismatches:
        raise click.ClickException(
            f"speculative output differed from plain output on prompts {report.mismatches}: a bug"
        )
    click.echo("outputs identical: yes (every prompt, every repeat)")


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
