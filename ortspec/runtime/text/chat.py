"""Chat templates: render a checkpoint's Jinja `chat_template` the way transformers does, within limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ortspec.runtime.errors import ChatTemplateError
from ortspec.runtime.options import check_text

if TYPE_CHECKING:
    from ortspec.runtime.text.sandbox import Budget

Message = dict[str, Any]


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
            _text(f"message {index}'s {key}", message[key])
    return list(messages)


def _text(what: str, text: str) -> str:
    try:
        return check_text(what, text)
    except ValueError as exc:
        raise ChatTemplateError(str(exc)) from None


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    budget: Budget | None = None,
) -> str:
    """The prompt text for `messages` (dicts with `role` and `content`), rendered within `budget` (default:
    the sandbox's limits of time and size)."""
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer_config.json has no chat_template): "
            "use generate() with a plain prompt instead"
        )
    from ortspec.runtime.text.sandbox import render  # jinja2 is imported only when a chat is rendered

    variables = dict(messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **special_tokens)
    return _text("the chat template's output", render(template, variables, budget))
