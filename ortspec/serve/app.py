"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..runtime import GenerationConfig, GenerationResult, Pipeline, TextStream
from .access import RequireKey
from .errors import APIError, as_api_error, install_error_handlers
from .metrics import CONTENT_TYPE, Metrics
from .schema import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    Responses,
    finish_reason,
    parse_body,
    validate,
)
from .slots import Event, Slots

T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """How the server admits and bounds requests."""

    model: str = "ortspec"  # the model id clients name (and /v1/models lists)
    max_queue: int = 16  # requests waiting for a slot; one more is a 429
    timeout: float = 300.0  # seconds per request, waiting for a slot included
    max_body_bytes: int = 1 << 20  # larger request bodies are a 413
    max_tokens: int = 512  # new tokens when a request sets no max_tokens (fewer if the context is shorter)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # generation options under each request's own
    api_key: str | None = field(default=None, repr=False)  # every route but /health needs it (Bearer), if set
    read_timeout: float = 15.0  # seconds a client has to send a whole request, headers and body
    max_connections: int = 128  # open connections; one more is refused with a 503

    def __post_init__(self) -> None:
        GenerationConfig.from_options(dict(self.defaults))  # a bad default fails here, not on every request
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty or blank")


def create_app(pipelines: Sequence[Pipeline], settings: ServeSettings) -> FastAPI:
    """An app serving `pipelines`, one generation at a time on each (see `slots.load_pipelines`)."""
    slots = Slots(pipelines, settings.max_queue)
    started = int(time.time())
    chat_template = pipelines[0].manifest.tokenizer.chat_template
    app = FastAPI(title="ortspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slots = slots
    install_error_handlers(app)
    metrics = Metrics(slots)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(metrics.middleware)  # outermost: 401s are counted too

    def model_card() -> dict[str, Any]:
        return {"id": settings.model, "object": "model", "created": started, "owned_by": "ortspec"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "slots": slots.size, "busy": slots.busy, "waiting": slots.waiting}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, settings.model)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = validate(ChatRequest, await read_json(request, settings.max_body_bytes))
        if not chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions with a plain prompt")
        messages = [message.as_template_message() for message in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await respond(request, body, True, lambda pipe: pipe.chat_prompt(messages), max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = validate(CompletionRequest, await read_json(request, settings.max_body_bytes))
        prompt = body.single_prompt()

        def prompt_ids(pipe: Pipeline) -> list[int]:
            return pipe.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

        return await respond(request, body, False, prompt_ids, body.max_tokens)

    async def respond(
        request: Request,
        body: GenerationRequest,
        chat: bool,
        prompt_ids: Callable[[Pipeline], list[int]],
        max_tokens: int | None,
    ) -> Response:
        _check_model(body.model, settings.model)
        options = {**settings.defaults, **body.options()}
        try:
            GenerationConfig.from_options(options)  # bad options are a 400 before the request waits for a slot
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

        def start(pipe: Pipeline) -> TextStream:  # in the slot's thread
            ids = prompt_ids(pipe)
            room = pipe.target.max_length - len(ids)
            new_tokens = max_tokens or max(1, min(settings.max_tokens, room))
            return pipe.stream(ids, **options, max_new_tokens=new_tokens)

        events = metrics.observe(slots.generate(start, settings.timeout))
        # the first delta: a slot was free and the prompt and options passed the pipeline's checks
        first = await _unless_client_leaves(request, anext(events))
        if first is None:
            return Response(status_code=499)  # the client left while waiting: nobody reads this
        responses = Responses(chat, settings.model)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _sse(first, events, responses, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _unless_client_leaves(request, _last(first, events))
        if result is None:
            return Response(status_code=499)
        return JSONResponse(responses.complete(result.text, result.stats))

    return app


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(
            404, f"model {name!r} does not exist: this server serves {served!r}", param="model", code="model_not_found"
        )


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, refusing other content types (415) and bodies over `limit` bytes (413)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the body must be application/json, got Content-Type {content_type or 'none'!r}")
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large
    except ClientDisconnect as exc:
        raise APIError(400, "the client disconnected while sending the body") from exc
    return parse_body(bytes(raw))


async def _last(first: Event, events: AsyncGenerator[Event, None]) -> GenerationResult:
    """Run the generation to its end; the result holds the whole text."""
    item = first
    while not isinstance(item, GenerationResult):
        item = await anext(events)
    await events.aclose()
    return item


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it (and so its generation) if the client disconnects first: None then.
    Its errors are raised as API errors."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watch.cancel()
    if not task.done() or task.cancelled():
        return None
    try:
        return task.result()
    except Exception as exc:
        raise as_api_error(exc) from exc


async def _sse(
    first: Event, events: AsyncGenerator[Event, None], responses: Responses, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: the deltas as chunks, the finish reason, optionally the usage, then [DONE].
    A failure after the first byte can only be told in the stream: as an OpenAI error event."""
    try:
        if responses.chat:
            yield _event(responses.chunk("", first=True))
        item = first
        while not isinstance(item, GenerationResult):
            yield _event(responses.chunk(item))
            item = await anext(events)
        yield _event(responses.chunk(None, finish=finish_reason(item.stats)))
        if include_usage:
            yield _event(responses.usage_chunk(item.stats))
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        yield _event(as_api_error(exc).body())
    finally:
        await events.aclose()  # a client that left: its generation stops and frees the slot


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
