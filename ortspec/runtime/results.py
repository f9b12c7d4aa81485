"""What a generation hands back: its text and token ids, its stats, and the stream of text deltas."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationStats:
    """How a generation went: speed, calls and how many drafts the target accepted."""

    prompt_tokens: int
    new_tokens: int
    target_calls: int
    draft_calls: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None  # accepted / drafted; None when nothing was drafted
    tokens_per_target_call: float  # new tokens / target calls after the prefill
    seconds: float  # wall time of the whole generation, prefill included
    time_to_first_token: float
    tokens_per_second: float  # new tokens / seconds
    draft_tokens: int | str  # γ as configured: an integer, "adaptive", or 0 for plain decoding
    drafter: str  # "model" (a draft LM), "head" (a feature-level draft head), "hybrid", "ngram", "suffix" or "none"
    accepted_per_round: tuple[int, ...]  # drafts the target accepted in each speculative round
    drafted_per_round: tuple[int, ...]  # drafts proposed in each round (γ actually used)
    undrafted_rounds: int  # rounds decoded without drafts although drafting was on (auto chose γ=0, no proposal)
    finish_reason: str  # "eos", "length" or "stop"
    cached_tokens: int = 0  # prompt tokens reused from an earlier sequence's cache (the prefix cache): not fed again


@dataclass(frozen=True)
class GenerationResult:
    """New text, the new token ids (eos or the stop string's last token included), and stats."""

    text: str
    token_ids: list[int]
    stats: GenerationStats


Events = Generator[tuple[str, GenerationResult | None], None, None]  # text deltas, then ("", the result)


class TextStream:
    """Iterator of text deltas from `Pipeline.stream`; `.result` holds the full result once exhausted.

    Each stream decodes in states of its own: streams advanced in turns, or alongside `generate`
    calls, do not affect one another. `close()` (or dropping the stream) ends it early, from any thread.
    """

    def __init__(self, events: Events) -> None:
        self._events = events  # held directly, no cycle: a dropped stream ends (and frees its states) at once
        self._running = threading.Lock()  # held while a thread advances the generator
        self._stop = threading.Event()
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        with self._running:
            for delta, result in self._events:
                if self._stop.is_set():
                    break
                if result is not None:
                    self.result = result
                elif delta:
                    return delta
            self._events.close()
        raise StopIteration

    def close(self) -> None:
        """Stop generating and hand the stream's decoder states back to the pipeline. Called while another
        thread iterates the stream, it stops the generation after its current round (that thread's
        iteration then ends), since a running generator cannot be closed from outside."""
        self._stop.set()
        if self._running.acquire(blocking=False):
            try:
                self._events.close()
            finally:
                self._running.release()
