"""OpenAI request bodies -> validated ortspec generation options, and results -> OpenAI response bodies.

Validation is strict (no "0.5" for a number, no NaN) so that hostile input is a 400 naming the field,
never a crash deeper down.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime import GenerationStats
from ..runtime.options import DrafterKind
from .errors import APIError

MAX_STOPS = 4  # as OpenAI
MAX_SEED = 2**64 - 1
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
# OpenAI fields we cannot honour: a request that sets one of them to anything but its default is a 400
UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "tools": None,
    "functions": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
# the drafters a request may name: the CLI's --draft choices, and "none" for plain decoding
RequestDrafter = Literal[DrafterKind.MODEL, DrafterKind.HYBRID, DrafterKind.NGRAM, DrafterKind.SUFFIX, DrafterKind.NONE]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields common to chat and text completions. Besides OpenAI's: top_k, min_p, repetition_penalty
    and the drafting controls (draft, draft_tokens), as ortspec extensions (the client's extra_body)."""

    model: str | None = None  # omitted: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # omitted: the server default (greedy)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    draft: RequestDrafter | None = None
    draft_tokens: Annotated[int, Field(ge=1)] | Literal["auto", "adaptive"] | None = None
    # only their defaults are accepted (see UNSUPPORTED); typed loosely so a wrong value is a clear 400
    n: Any = 1
    best_of: Any = 1
    echo: Any = False
    suffix: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    presence_penalty: Any = 0
    frequency_penalty: Any = 0

    def options(self) -> dict[str, Any]:
        """Keyword options for Pipeline.stream: only those the request set (they go over the server's
        defaults); max_tokens is not among them, its default depends on the prompt's length."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
        options: dict[str, Any] = {"stop": tuple(stops)} if stops else {}
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "draft_tokens"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.draft is DrafterKind.NONE:
            options["use_draft"] = False
        elif self.draft is not None:
            options["draft"] = self.draft
        return options

    def check_supported(self) -> None:
        for name, default in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != default and value not in ({}, []):
                raise APIError(400, f"{name}: only {default!r} is supported, got {_short(value)}", param=name)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """What chat templates expect: role and plain-text content ("developer" is OpenAI's newer "system")."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {'type': 'text'} is supported", param="response_format")


class CompletionRequest(GenerationRequest):
    # a string, token ids, or a list holding one of them (OpenAI's batch form, one prompt only)
    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        return cast(str | list[int], prompt)  # a batch of one was unpacked above


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in a request body; invalid UTF-8, NaN/Infinity, deep nesting or non-objects are 400s."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({_short(exc)})") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:  # JSON's \ud800 escapes decode to lone surrogates, which are no text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, "the request body holds a lone surrogate (\\ud800-\\udfff), which is not text") from exc
    return data


def validate(model: type[GenerationRequest], data: dict[str, Any]) -> Any:
    """`model` from the body's data; the first problem becomes a 400 naming its field."""
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        # the path to the field, without pydantic's union-member labels ("prompt.str")
        loc = [str(part) for part in error["loc"] if isinstance(part, int) or part in _FIELD_NAMES]
        where = ".".join(loc) or "body"
        raise APIError(400, f"{where}: {error['msg']}", param=loc[0] if loc else None) from exc
    request.check_supported()
    return request


_FIELD_NAMES = {
    name
    for model in (ChatRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in model.model_fields
}


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, Exception) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- responses ---------------------------------------------------------------------------------------


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's name for how the generation ended: "stop" (eos or a stop string) or "length"."""
    return FINISH_REASONS.get(stats.finish_reason, stats.finish_reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's token counts, plus how the speculative decoding went (`speculative`)."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "speculative": {
            "drafter": stats.drafter,
            "draft_tokens": stats.draft_tokens,
            "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "acceptance_rate": stats.acceptance_rate,
            "target_calls": stats.target_calls,
            "draft_calls": stats.draft_calls,
            "tokens_per_target_call": stats.tokens_per_target_call,
            "tokens_per_second": stats.tokens_per_second,
            "time_to_first_token": stats.time_to_first_token,
            "seconds": stats.seconds,
        },
    }


class Responses:
    """Builds one request's response objects (its id, creation time and model are shared by every chunk)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, text: str, stats: GenerationStats) -> dict[str, Any]:
        """The whole answer (non-streaming)."""
        finish = finish_reason(stats)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish}])
        body["usage"] = usage(stats)
        return body

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed piece: a text delta, or the end (`finish`)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish}])

    def usage_chunk(self, stats: GenerationStats) -> dict[str, Any]:
        """The last chunk when the client asked for stream_options.include_usage: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(stats)
        return body
