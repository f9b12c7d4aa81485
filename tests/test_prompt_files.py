"""Prompt files (`ortspec bench --prompts`, `ortspec distill --prompts`): formats, and errors that say where."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ortspec.runtime.text.prompt_files import read_prompts, read_requests


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_files_hold_one_prompt_per_non_empty_line(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", ["Explain tides.", "", "  ", "Fix: x = = 1"])
    assert read_prompts(path) == ["Explain tides.", "Fix: x = = 1"]
    assert read_requests(path) == [[{"role": "user", "content": text}] for text in ("Explain tides.", "Fix: x = = 1")]


def test_json_lines_hold_strings_prompts_or_chats(tmp_path: Path) -> None:
    chat = [
        {"role": "developer", "content": "Be brief."},  # OpenAI's newer name for "system"
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},  # the logged answer: the target writes its own
    ]
    lines = [json.dumps("a string"), json.dumps({"prompt": "a prompt", "id": 3}), json.dumps({"messages": chat})]
    path = write(tmp_path / "log.jsonl", lines)
    assert read_requests(path) == [
        [{"role": "user", "content": "a string"}],
        [{"role": "user", "content": "a prompt"}],
        [{"role": "system", "content": "Be brief."}, *chat[1:-1]],
    ]
    assert read_prompts(write(tmp_path / "p.jsonl", lines[:2])) == ["a string", "a prompt"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "log.jsonl:2 is not valid JSON"),
        (json.dumps({"text": "x"}), 'log.jsonl:2: expected a "prompt" string or a "messages" list'),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "log.jsonl:2: each message needs a role"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "log.jsonl:2: a chat must end with a user"),
        (json.dumps({"messages": "hi"}), 'log.jsonl:2: "messages" must be a list'),
        (json.dumps(7), "log.jsonl:2: expected a string or an object, got int"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "log.jsonl", [json.dumps("fine"), line])
    with pytest.raises(ValueError, match=re.escape(message)):
        read_requests(path)


def test_bench_prompts_need_a_prompt_string(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape('p.jsonl:1: a prompt line needs a "prompt" string')):
        read_prompts(write(tmp_path / "p.jsonl", [json.dumps({"messages": []})]))
