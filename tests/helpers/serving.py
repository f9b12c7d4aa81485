"""Helpers for the server tests: a server in a thread, the client for it, a slowed pipeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import uvicorn

from ortspec import TextStream
from ortspec.serve import ServeSettings, create_app, server_config

PROMPTS = ["def f(x):", "import os", "class A:", "for i in range(3):", "x = [1, 2", "print(", "while True", "# note"]


def client_for(url: str) -> openai.OpenAI:
    """The official client on the server at `url`, without retries (a 429 must show)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


@contextmanager
def running(pipelines: list[Any], **settings: Any) -> Iterator[str]:
    """Serve `pipelines` on 127.0.0.1 (a free port) in a background thread, guarded as `ortspec serve`;
    yields the base URL."""
    options = ServeSettings(model="tiny", **settings)
    app = create_app(pipelines, options)
    config = server_config(
        app,
        "127.0.0.1",
        0,
        options.read_timeout,
        options.max_connections,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Slowed:
    """A pipeline whose streams wait `delay` seconds before each text delta, so that a test can hold a slot
    busy; it counts the generations that ended before their last delta (`closed_early`)."""

    def __init__(self, pipe: Any, delay: float) -> None:
        self.pipe = pipe
        self.delay = delay
        self.closed_early = 0
        self.finished = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def stream(self, prompt: Any, **options: Any) -> TextStream:
        inner = self.pipe.stream(prompt, **options)

        def events() -> Iterator[tuple[str, Any]]:
            done = False
            try:
                for delta in inner:
                    time.sleep(self.delay)
                    yield delta, None
                done = True
                self.finished += 1
                yield "", inner.result
            finally:
                inner.close()
                if not done:
                    self.closed_early += 1

        return TextStream(events())
