"""Training text for a draft, made offline: the target's own chats, and local text files.

A draft is judged by how often it guesses what the *target* will say, so the best data is the
target's own output (on-policy, as DistillSpec recommends). With no dataset at hand, the target
writes the prompts too: given only its chat template's opening of a user turn, an instruction-tuned
model samples a plausible user request (the Magpie trick), and then answers it greedily, the way
it will be asked to at serve time. Local text files (code, docs) can be added as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MARK = "\x00ortspec-user-turn\x00"


def user_turn_opening(pipe: Any) -> list[int]:
    """Token ids of a chat up to where the user's first message would begin."""
    text = pipe.tokenizer.decode(pipe.chat_prompt([{"role": "user", "content": MARK}]))
    if MARK not in text:
        raise ValueError("the chat template does not place the user's message in the prompt text")
    opening = text[: text.index(MARK)]
    return pipe.tokenizer.encode(opening, add_special_tokens=False)


def self_instructed_chats(
    pipe: Any,
    count: int,
    seed: int = 0,
    max_request_tokens: int = 80,
    max_answer_tokens: int = 256,
) -> Iterator[dict[str, Any]]:
    """`count` chats the target writes alone: a sampled user request, then its greedy answer.

    Each item holds the request text, the token ids of the whole rendered chat (prompt + answer) and
    how many of them are the prompt.
    """
    opening = user_turn_opening(pipe)
    room = pipe.target.max_length
    for i in range(count):
        request = pipe.generate(
            opening,
            max_new_tokens=min(max_request_tokens, room - len(opening)),
            temperature=1.0,
            top_p=0.95,
            seed=seed * 1_000_003 + i,
            use_draft=False,
        )
        text = request.text.strip()
        if request.stats.finish_reason != "eos" or len(text) < 8:
            continue  # cut off or empty: not a request a user would send
        prompt = pipe.chat_prompt([{"role": "user", "content": text}])
        if len(prompt) >= room:
            continue
        answer = pipe.generate(prompt, max_new_tokens=min(max_answer_tokens, room - len(prompt)), use_draft=False)
        yield {"request": text, "tokens": prompt + answer.token_ids, "prompt_tokens": len(prompt)}


def text_file_sequences(pipe: Any, paths: Sequence[Path], length: int = 512) -> Iterator[dict[str, Any]]:
    """Local text cut into sequences of `length` tokens (the last piece of each file may be shorter)."""
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            ids = pipe.tokenizer.encode(text, add_special_tokens=False)
            for start in range(0, len(ids), length):
                piece = ids[start : start + length]
                if len(piece) >= 16:
                    yield {"source": str(file), "tokens": piece}


def append_jsonl(path: Path, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Write each item as one JSON line as it comes (so an interrupted run keeps what it made)."""
    with open(path, "a", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
            f.flush()
            yield item


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Items of a JSONL file; a last line cut short by an interrupted run is skipped."""
    if not path.is_file():
        return []
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return items
