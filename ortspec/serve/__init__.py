"""`ortspec serve`: an OpenAI-compatible HTTP server for a deployment package (the `serve` extra:
FastAPI + uvicorn). The runtime never imports this package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .app import ServeSettings, create_app
from .slots import load_pipelines

__all__ = ["ServeSettings", "create_app", "load_pipelines", "serve"]


def serve(
    package: str | Path,
    settings: ServeSettings,
    parallel: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    load_options: dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
) -> None:
    """Load `parallel` slots of `package` and serve them until interrupted."""
    import uvicorn

    pipelines = load_pipelines(package, parallel, **(load_options or {}))
    for pipe in dict.fromkeys(pipelines):  # measured (or read) now, not inside the first requests
        pipe.on_calibrate = report
        pipe.calibration()
    report(f"serving {settings.model!r} from {package} on http://{host}:{port}/v1 ({parallel} slot(s))")
    uvicorn.run(create_app(pipelines, settings), host=host, port=port, log_level="info")
