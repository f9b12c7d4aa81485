"""Prompt files: what `ortspec bench` measures and what `ortspec distill --prompts` has the target answer.

A file is either plain text, one prompt per non-empty line, or JSON Lines (`.jsonl`), one per line:
a JSON string, {"prompt": "..."}, or (for chats) {"messages": [{"role": ..., "content": ...}, ...]} as
chat logs and OpenAI-style request logs hold them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ortspec.runtime.package.json_file import parse_json
from ortspec.runtime.text.chat import Message

ROLES = ("system", "developer", "user", "assistant")  # "developer": OpenAI's newer "system", read as it
MAX_FILE_BYTES = 256 << 20  # a prompt file is read whole: beyond this (or /dev/zero), refuse rather than fill memory


def _text(path: Path) -> str:
    """The file's text, read up to MAX_FILE_BYTES (a device or a pipe may never end)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except ValueError:  # open() refuses a NUL byte in a path
        raise ValueError(f"{str(path)!r} is no file name (it holds a NUL byte)") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB; give a smaller prompt file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _entries(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, entry) per non-empty line: the line's text, or its JSON value in a .jsonl file."""
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        yield where, parse_json(line, where) if Path(path).suffix == ".jsonl" else line


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file, as text (a line, a JSON string or an object's "prompt")."""
    prompts = []
    for where, entry in _entries(path):
        if isinstance(entry, dict):
            if not isinstance(entry.get("prompt"), str):
                hint = " (chat logs: `ortspec bench --chat`)" if "messages" in entry else ""
                raise ValueError(f'{where}: a prompt line needs a "prompt" string, got keys {sorted(entry)}{hint}')
            entry = entry["prompt"]
        prompts.append(entry if isinstance(entry, str) else json.dumps(entry))
    return prompts


def read_requests(path: Path) -> list[list[Message]]:
    """The chats of a file, each ending with the user turn to be answered: a prompt becomes one user
    message; a "messages" list is checked (roles, text contents), and a last assistant message is dropped,
    since the target is to give its own answer."""
    chats = []
    for where, entry in _entries(path):
        if isinstance(entry, dict) and "messages" in entry:
            chats.append(_checked_messages(entry["messages"], where))
        elif isinstance(entry, dict):
            if not isinstance(entry.get("prompt"), str):
                raise ValueError(f'{where}: expected a "prompt" string or a "messages" list, got keys {sorted(entry)}')
            chats.append([{"role": "user", "content": entry["prompt"]}])
        elif isinstance(entry, str):
            chats.append([{"role": "user", "content": entry}])
        else:
            raise ValueError(f"{where}: expected a string or an object, got {type(entry).__name__}")
    return chats


def _checked_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a text content")
    chat = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
    if chat and chat[-1]["role"] == "assistant":
        chat = chat[:-1]  # the logged answer: the target writes its own
    if not chat or chat[-1]["role"] != "user":
        raise ValueError(f"{where}: a chat must end with a user message (or a user message and its answer)")
    return chat
