"""`ortspec serve`: a package behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ortspec.models.catalog import resolve_package
from ortspec.runtime.options import DRAFTERS

from .options import PACKAGE, load_options, report, runtime_options


@click.command()
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
@runtime_options
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
        from ortspec.serve import ServeSettings
        from ortspec.serve import serve as run_server
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
        from ortspec.models.default_pair import default_package

        package = str(default_package(report=report))
    path = resolve_package(package, report)
    run_server(path, settings, parallel, host, port, load_options(runtime), report, batch)
