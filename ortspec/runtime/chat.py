"""Chat templates: render a checkpoint's Jinja `chat_template` the way transformers does, within limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError

from .options import check_text
from .sandbox import Budget, ChatTemplateError, bounded_environment, compile_bounded, expect, render

Message = dict[str, Any]

__all__ = ["ChatTemplateError", "Message", "render_chat"]


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    if indent:  # each line gains up to `indent` per level: bound the text before writing it
        compact = json.dumps(value, ensure_ascii=ensure_ascii, separators=separators)
        expect((len(compact) + 1) * (1 + (len(indent) if isinstance(indent, str) else indent)))
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> Template:
    env = bounded_environment()
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return compile_bounded(env, template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from None


def check_messages(messages: Any) -> list[Message]:
    """`messages` as a list, if it is a list of dicts whose `role` and `content` are strings."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {index} needs a 'role' and a 'content', got {message!r:.200}")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise ChatTemplateError(f"message {index}'s {key} must be a string, got {message[key]!r:.200}")
            try:
                check_text(f"message {index}'s {key}", message[key])
            except ValueError as exc:
                raise ChatTemplateError(str(exc)) from None
    return list(messages)


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    budget: Budget | None = None,
) -> str:
    """The prompt text for `messages` (dicts with `role` and `content`), rendered within `budget` (default:
    the sandbox's time and size limits)."""
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer_config.json has no chat_template): "
            "use generate() with a plain prompt instead"
        )
    variables = dict(messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **special_tokens)
    try:
        text = render(_compile(template), variables, budget or Budget())
    except ChatTemplateError:
        raise
    except Exception as exc:  # the template is a package's code: whatever it raises is its error
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}"[:500]) from None
    try:
        return check_text("the chat template's output", text)
    except ValueError as exc:
        raise ChatTemplateError(str(exc)) from None
