"""`ortspec generate` and `ortspec chat`: text from a package, streamed as tokens are accepted."""

from __future__ import annotations

import sys
from typing import Any

import click

from ortspec.models.catalog import check_package

from .options import PACKAGE, generation_options, load_pipeline, runtime_options
from .output import echo_stream, print_stats


def _parse_token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter("with --token-ids the prompt must be integers separated by spaces or commas") from exc


def _package_and_prompt(args: tuple[str, ...]) -> tuple[str, str]:
    """`[PACKAGE] PROMPT`: with no package, the embedded default pair."""
    if len(args) == 2:
        try:
            return check_package(args[0]), args[1]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="PACKAGE") from None
    if len(args) == 1:
        from ortspec.models.default_pair import default_package

        return str(default_package(report=lambda line: click.echo(line, err=True))), args[0]
    raise click.UsageError("give PROMPT, or PACKAGE and PROMPT")


@click.command()
@click.argument("args", nargs=-1, metavar="[PACKAGE] PROMPT")
@click.option("--token-ids", is_flag=True, help="PROMPT is a list of token ids, used as-is.")
@click.option("--stats", is_flag=True, help="Print acceptance, tokens/s and call counts (to stderr).")
@generation_options()
@runtime_options
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
    pipe = load_pipeline(package, runtime)
    prompt_in = _parse_token_ids(prompt) if token_ids else prompt
    result = echo_stream(pipe.stream(prompt_in, **options))
    if stats:
        print_stats(result.stats)


@click.command()
@click.argument("package", type=PACKAGE)
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--stats", is_flag=True, help="Print acceptance and speed after each reply (to stderr).")
@generation_options()
@runtime_options
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
    pipe = load_pipeline(package, runtime)
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
        result = echo_stream(pipe.chat_stream(messages, **options))
        messages.append({"role": "assistant", "content": result.text})
        if stats:
            print_stats(result.stats)
