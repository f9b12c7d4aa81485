"""/metrics in Prometheus' text format (as llama-server and vLLM expose): requests, tokens, speed,
acceptance, queue and slots. The format is a few lines of text, written here rather than with a library."""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from ..runtime import GenerationResult, GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")  # other paths: "other"

Sample = tuple[dict[str, str], float]


class Metrics:
    """Counters of the server's life, kept on the event loop; the slots' gauges are read when scraped."""

    def __init__(self, slots: Any) -> None:
        self.slots = slots
        self.responses: collections.Counter[tuple[str, int]] = collections.Counter()  # (route, status)
        self.generations = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.new_tokens = 0
        self.seconds = 0.0
        self.drafted = 0
        self.accepted = 0

    def record(self, stats: GenerationStats) -> None:
        self.generations += 1
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.new_tokens += stats.new_tokens
        self.seconds += stats.seconds
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens

    async def observe(self, events: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """`events` passed through, recording the generation's stats when its result goes by."""
        try:
            async for item in events:
                if isinstance(item, GenerationResult):
                    self.record(item.stats)
                yield item
        finally:
            await events.aclose()

    def middleware(self, app: Any) -> Callable[..., Any]:
        """ASGI middleware counting each HTTP response by route and status (unknown paths as one route)."""

        async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

            async def send_counted(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    self.responses[route, message["status"]] += 1
                await send(message)

            await app(scope, receive, send_counted)

        return counted

    def text(self) -> str:
        alpha = self.accepted / self.drafted if self.drafted else math.nan
        speed = self.new_tokens / self.seconds if self.seconds else math.nan
        families = [
            _family(
                "ortspec_requests_total",
                "counter",
                "HTTP responses sent, by route and status code.",
                [({"route": r, "status": str(s)}, n) for (r, s), n in sorted(self.responses.items())],
            ),
            _family("ortspec_generations_total", "counter", "Generations that ran to their end.", self.generations),
            _family("ortspec_prompt_tokens_total", "counter", "Their prompt tokens.", self.prompt_tokens),
            _family(
                "ortspec_prompt_cached_tokens_total",
                "counter",
                "Prompt tokens whose KV came from the prefix cache (not computed again).",
                self.cached_tokens,
            ),
            _family("ortspec_generated_tokens_total", "counter", "Tokens those generations made.", self.new_tokens),
            _family(
                "ortspec_generation_seconds_total", "counter", "Wall time of those generations, summed.", self.seconds
            ),
            _family(
                "ortspec_tokens_per_second",
                "gauge",
                "Generated tokens per second of a generation's wall time, over all finished generations (the "
                "speed one client sees; the server's throughput is rate(ortspec_generated_tokens_total)).",
                speed,
            ),
            _family("ortspec_drafted_tokens_total", "counter", "Draft tokens proposed to the target.", self.drafted),
            _family("ortspec_accepted_tokens_total", "counter", "Draft tokens the target accepted.", self.accepted),
            _family("ortspec_acceptance_rate", "gauge", "Accepted / drafted tokens (α), NaN before any draft.", alpha),
            _family("ortspec_requests_waiting", "gauge", "Requests waiting for a slot.", self.slots.waiting),
            _family("ortspec_slots_busy", "gauge", "Slots generating now.", self.slots.busy),
            _family("ortspec_slots", "gauge", "Slots: generations that can run at once.", self.slots.size),
        ]
        return "".join(families)


def _family(name: str, kind: str, help_text: str, samples: float | Iterable[Sample]) -> str:
    """One metric family: its HELP and TYPE lines, then a line per sample."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in [({}, samples)] if isinstance(samples, (int, float)) else samples:
        tags = ",".join(f'{key}="{label}"' for key, label in labels.items())
        lines.append(f"{name}{{{tags}}} {_number(value)}" if tags else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "NaN" if math.isnan(value) else repr(float(value))
