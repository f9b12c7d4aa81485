"""Scale-out on Ray Serve (the `ray` extra): N replicas of the same app, each loading the package, behind
Ray's HTTP proxy. Each replica is the single-machine server: its own slots, queue, limits and errors.

Run it with Ray's own CLI, locally or against a cluster (RAY_ADDRESS), with arguments as key=value:

    serve run ortspec.serve.ray_app:build package=/models/pair replicas=4 parallel=1 model=pair

The package path must exist on every node that runs a replica (a shared filesystem, or the same path
copied to each). With ORTSPEC_API_KEY set where `serve run` runs, every route but /health needs that key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from .access import KEY_VARIABLE
from .app import ServeSettings, create_app
from .slots import load_pipelines


@serve.ingress()
class Replica:
    """One replica: `parallel` slots of the package, served by the same app as `ortspec serve`."""

    def __init__(self, package: str, settings: ServeSettings, parallel: int, load_options: dict[str, Any]) -> None:
        pipelines = load_pipelines(package, parallel, **load_options)
        for pipe in dict.fromkeys(pipelines):  # auto γ's step costs: read (or measured) now, not in a request
            pipe.calibration()
        self._app = create_app(pipelines, settings)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def deployment(
    package: str | Path,
    settings: ServeSettings,
    replicas: int = 2,
    parallel: int = 1,
    load_options: dict[str, Any] | None = None,
    cpus_per_replica: float = 1.0,
) -> Application:
    """The Ray Serve application: `replicas` copies of the server. Ray's proxy sends each replica at most
    its slots plus its queue at once, so that a replica's own 429 stays the signal of a full queue."""
    options = serve.deployment(  # as a decorator: the form Ray's annotations type as giving a Deployment
        name="ortspec",
        num_replicas=replicas,
        max_ongoing_requests=parallel + settings.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )(Replica)
    return options.bind(str(package), settings, parallel, dict(load_options or {}))


def build(args: dict[str, str]) -> Application:
    """Application builder for `serve run ortspec.serve.ray_app:build package=... [replicas=2] [parallel=1]
    [model=NAME] [max_queue=16] [timeout=300] [max_tokens=512] [threads=N] [cpus_per_replica=1]`."""
    known = {"replicas", "parallel", "model", "max_queue", "timeout", "max_tokens", "threads", "cpus_per_replica"}
    unknown = set(args) - known - {"package"}
    if unknown or "package" not in args:
        raise ValueError(f"give package=PATH and any of {sorted(known)}; unknown: {sorted(unknown)}")
    package = str(Path(args["package"]).resolve())
    settings = ServeSettings(
        model=args.get("model", Path(package).name),
        max_queue=int(args.get("max_queue", 16)),
        timeout=float(args.get("timeout", 300)),
        max_tokens=int(args.get("max_tokens", 512)),
        api_key=os.environ.get(KEY_VARIABLE) or None,
    )
    load_options = {"threads": int(args["threads"])} if "threads" in args else {}
    return deployment(
        package,
        settings,
        replicas=int(args.get("replicas", 2)),
        parallel=int(args.get("parallel", 1)),
        load_options=load_options,
        cpus_per_replica=float(args.get("cpus_per_replica", 1)),
    )
