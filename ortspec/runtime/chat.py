"""Chat templates: render a checkpoint's Jinja `chat_template` the way transformers does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The package has no chat template, or the template rejected the conversation."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages` (dicts with `role` and `content`)."""
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer_config.json has no chat_template): "
            "use generate() with a plain prompt instead"
        )
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"each message needs a 'role' and a 'content', got {message!r}")
    return _compile(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
    )
