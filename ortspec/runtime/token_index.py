"""Token sequences indexed by their n-grams: where has the end of a sequence occurred before, and what followed?

Sequences are stored one after another in a flat list, separated by a marker no token equals, so a
match or a continuation never runs from one sequence into the next. Every n-gram of the orders in
`ORDERS` maps (by hash) to the positions right after its occurrences, oldest first; adding tokens
indexes only the new ones. With `max_tokens` the oldest sequences are evicted (their index entries
with them) once the store holds more: memory stays bounded however many sequences are added.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = -1
ORDERS = (1, 2, 4, 8)  # n-gram lengths indexed; a hit is extended backwards to its true match length
MAX_MATCH = 32  # match lengths are measured up to this many tokens


@dataclass(frozen=True)
class Matches:
    """The occurrences of the longest suffix found: its length and where each continuation starts."""

    length: int
    starts: list[int]  # positions (in the index's numbering) of the tokens that followed, latest first


class TokenIndex:
    """Stored token sequences, their n-gram index and the lookup of a query's longest matching suffix."""

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self._tokens: list[int] = []
        self._base = 0  # position (never reused) of _tokens[0]: positions survive evictions
        self._starts: deque[int] = deque()  # position where each stored sequence starts, oldest first
        self._follows: dict[int, list[int]] = {}  # hash of an n-gram -> positions right after it, oldest first
        self._stored = 0  # tokens held, separators excluded

    @property
    def tokens(self) -> int:
        """Tokens held (separators excluded)."""
        return self._stored

    @property
    def sequences(self) -> int:
        return len(self._starts)

    @property
    def entries(self) -> int:
        """Index entries held: at most len(ORDERS) per token."""
        return sum(len(positions) for positions in self._follows.values())

    @property
    def end(self) -> int:
        """Position after the last stored token."""
        return self._base + len(self._tokens)

    def at(self, position: int) -> int:
        """The token at `position`, SEPARATOR past the end or between sequences."""
        index = position - self._base
        return self._tokens[index] if 0 <= index < len(self._tokens) else SEPARATOR

    def start_sequence(self) -> None:
        """Later tokens begin a new sequence: nothing matches or continues across the boundary."""
        if self._tokens:
            self._tokens.append(SEPARATOR)
        self._starts.append(self.end)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append `tokens` to the current sequence and index the n-grams that end in them."""
        if not self._starts:
            self.start_sequence()
        store, start = self._tokens, self._starts[-1] - self._base
        for token in tokens:
            store.append(int(token))
            end = len(store)
            for n in ORDERS:
                if end - n < start:
                    break
                self._follows.setdefault(hash(tuple(store[end - n : end])), []).append(self._base + end)
        self._stored += len(tokens)
        self._evict()

    def add(self, sequence: Sequence[int]) -> None:
        """Store `sequence` as a sequence of its own (only its last `max_tokens` if it is longer)."""
        if self.max_tokens is not None:
            sequence = sequence[-self.max_tokens :]
        self.start_sequence()
        self.extend(sequence)

    def _evict(self) -> None:
        """Drop the oldest sequences while more than `max_tokens` tokens are held (never the newest)."""
        while self.max_tokens is not None and self._stored > self.max_tokens and len(self._starts) > 1:
            first, following = self._starts.popleft(), self._starts[0]
            old = self._tokens[first - self._base : following - 1 - self._base]  # without its separator
            for end in range(1, len(old) + 1):
                for n in ORDERS:
                    if end - n < 0:
                        break
                    key = hash(tuple(old[end - n : end]))
                    positions = self._follows.get(key)
                    if positions is None:
                        continue
                    del positions[: bisect_left(positions, following)]
                    if not positions:
                        del self._follows[key]
            del self._tokens[: following - self._base]
            self._base = following
            self._stored -= len(old)

    def find(self, query: Sequence[int], limit: int = 16) -> Matches:
        """Occurrences of the longest suffix of `query` (up to MAX_MATCH tokens) followed by at least one
        stored token; of the latest `limit` hits of the longest indexed n-gram that has any."""
        for n in reversed(ORDERS):
            if n > len(query):
                continue
            positions = self._follows.get(hash(tuple(query[-n:])))
            if not positions:
                continue
            best, starts = 0, []
            for start in reversed(positions[-limit - 1 :]):
                if self.at(start) == SEPARATOR:
                    continue  # nothing followed (the query's own end, or the end of a sequence)
                length = self._match_length(query, start)
                if length > best:
                    best, starts = length, [start]
                elif length == best and length:
                    starts.append(start)
            if best:
                return Matches(best, starts[:limit])
        return Matches(0, [])

    def _match_length(self, query: Sequence[int], start: int) -> int:
        """How many tokens before `start` equal the end of `query` (at most MAX_MATCH)."""
        limit = min(MAX_MATCH, len(query))
        length = 0
        while length < limit and self.at(start - 1 - length) == query[-1 - length]:
            length += 1
        return length
