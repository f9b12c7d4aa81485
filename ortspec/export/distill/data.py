"""Training text for a draft, made offline: the target's own chats, and local text files.

A draft is judged by how often it guesses what the *target* will say, so the best data is the
target's own output (on-policy, as DistillSpec recommends). With no dataset at hand, the target
writes the prompts too: given only its chat template's opening of a user turn, an instruction-tuned
model samples a plausible user request (the Magpie trick), and then answers it greedily, the way
it will be asked to at serve time, and the features of every token are kept as it goes. Left to
itself, a small model's requests collapse onto a few openings ("Can you ...", "I'm looking for
..."), so most requests are begun with one of `REQUEST_STARTS` (chosen by the seed) and the model
writes the rest: explanations, stories, lists, edits and questions, as users ask. Requests of
the user's own (`--prompts`: the traffic the draft will serve) are answered first when given, and
local text files (code, docs) can be added as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .features import greedy_answer

MARK = "\x00ortspec-user-turn\x00"
REQUEST_STARTS = (  # "": the model's own opening
    "", "", "Explain", "Write", "What", "How", "Why", "Describe", "Give me", "List", "Summarize",
    "Compare", "Tell me", "Help me", "Rewrite", "Translate", "Fix", "Create", "Suggest", "Is", "Who",
    "When", "Which", "Should I", "Please", "I need", "Write a short story", "Write a Python function",
)  # fmt: skip


def request_start(seed: int) -> str:
    """The words a request sampled with `seed` begins with ("" leaves the whole request to the model)."""
    return REQUEST_STARTS[seed % len(REQUEST_STARTS)]


def user_turn_opening(pipe: Any) -> list[int]:
    """Token ids of a chat up to where the user's first message would begin."""
    text = pipe.tokenizer.decode(pipe.chat_prompt([{"role": "user", "content": MARK}]))
    if MARK not in text:
        raise ValueError("the chat template does not place the user's message in the prompt text")
    opening = text[: text.index(MARK)]
    return pipe.tokenizer.encode(opening, add_special_tokens=False)


def request_seeds(base: int, writer: int = 0, writers: int = 1) -> Iterator[int]:
    """Seeds of the request attempts base * 1_000_003 + i, for i = writer, writer + writers, ...: writers
    of one run share out the attempts, so no two sample the same request."""
    return (base * 1_000_003 + i for i in itertools.count(writer, writers))


def writer_seeds(base: int, writer: int = 0, writers: int = 1, todo: Sequence[int] | None = None) -> Iterator[int]:
    """What writer `writer` of `writers` answers: sampled requests' seeds (`request_seeds`), or with `todo`,
    every writers-th of those indices of the given requests."""
    return request_seeds(base, writer, writers) if todo is None else iter(todo[writer::writers])


def self_instructed_chats(
    pipe: Any,
    seeds: Iterable[int],
    max_request_tokens: int = 80,
    max_answer_tokens: int = 256,
    requests: Sequence[Sequence[dict[str, str]]] | None = None,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Chats the target answers, one per seed: a sampled user request (or, with `requests`, the chat
    `requests[seed]`, ending with a user turn), then its greedy answer.

    `pipe`'s target must keep its hidden states (`features.open_target`). Each chat comes with the
    features of all its tokens (`features.greedy_answer`); its item holds the request text and seed
    (or index in `requests`), the token ids of the whole rendered chat (prompt + answer) and how many
    of them are the prompt. Requests too long to answer are skipped. Several threads may write at once
    on one `pipe`; with a batched target their steps share calls.
    """
    opening = user_turn_opening(pipe) if requests is None else []
    room = pipe.target.max_length
    for seed in seeds:
        if requests is None:
            text = _sampled_request(pipe, opening, seed, max_request_tokens)
            if text is None:
                continue
            messages, item = [{"role": "user", "content": text}], {"request": text, "seed": seed}
        else:
            messages = list(requests[seed])
            item = {"request": messages[-1]["content"], "request_index": seed}
        prompt = pipe.chat_prompt(messages)
        if len(prompt) >= room - 1:  # room for one answer token and the step that reads it
            continue
        max_new = min(max_answer_tokens, room - 1 - len(prompt))
        with pipe.target_states.state() as writer:  # held only while answering: a batch waits for held rows
            answer, features = greedy_answer(writer, prompt, max_new, pipe.eos_token_ids)
        yield {**item, "tokens": prompt + answer, "prompt_tokens": len(prompt)}, features


def _sampled_request(pipe: Any, opening: list[int], seed: int, max_request_tokens: int) -> str | None:
    """A user request the target samples after the chat's user-turn `opening` (None: cut off or empty)."""
    start = request_start(seed)
    begun = opening + (pipe.tokenizer.encode(start, add_special_tokens=False) if start else [])
    request = pipe.generate(
        begun,
        max_new_tokens=min(max_request_tokens, pipe.target.max_length - len(begun)),
        temperature=1.0,
        top_p=0.95,
        seed=seed,
        use_draft=False,
    )
    text = (start + request.text).strip()
    if request.stats.finish_reason != "eos" or len(text) < 8:
        return None  # not a request a user would send
    return text


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
