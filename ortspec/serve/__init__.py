"""`ortspec serve`: an OpenAI-compatible HTTP server for a deployment package (the `serve` extra:
FastAPI + uvicorn). The runtime never imports this package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .app import ServeSettings, create_app
from .connections import server_config
from .slots import load_pipelines

__all__ = ["ServeSettings", "create_app", "load_pipelines", "serve", "server_config"]


def serve(
    package: str | Path,
    settings: ServeSettings,
    parallel: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    load_options: dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
    batch: bool = True,
) -> None:
    """Load `parallel` slots of `package` (batched, where it can) and serve them until interrupted."""
    import uvicorn

    from ortspec.runtime.model.batching import batch_problem

    pipelines = load_pipelines(package, parallel, batch, **(load_options or {}))
    for pipe in dict.fromkeys(pipelines):  # measured (or read) now, not inside the first requests
        pipe.on_calibrate = report
        pipe.calibration()
    batching = "off"
    if pipelines[0].batch is not None:
        batching = "on"
    elif batch and parallel > 1:
        batching = f"off: {batch_problem(pipelines[0].target) or 'not available'}"
    report(
        f"serving {settings.model!r} from {package} on http://{host}:{port}/v1 "
        f"({parallel} slot(s), continuous batching {batching})"
    )
    config = server_config(
        create_app(pipelines, settings), host, port, settings.read_timeout, settings.max_connections, log_level="info"
    )
    uvicorn.Server(config).run()
