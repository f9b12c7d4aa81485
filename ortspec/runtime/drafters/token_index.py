"""Token sequences indexed by their n-grams: where has the end of a sequence occurred before, and what followed?

Sequences are stored one after another in a flat list, separated by a marker no token equals, so a
match or a continuation never runs from one sequence into the next. For every n-gram of the orders in
`ORDERS`, a dict maps its hash to its latest occurrence and a per-order array links each occurrence to
the one before (as in llama.cpp's n-gram cache and zlib's hash chains): one dict entry per distinct
n-gram and 8 bytes per token and order, and adding tokens indexes only the new ones. With
`max_tokens` the oldest sequences are evicted (their index entries with them) once the store holds
more: memory stays bounded however many sequences are added.
"""

from __future__ import annotations

from array import array
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
    """Stored token sequences, their n-gram index and the lookup of a query's longest matching suffix.

    Positions count tokens (and separators) ever stored, so they survive evictions; an n-gram's
    occurrence is named by the position right after it, where its continuation starts.
    """

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self._tokens: list[int] = []
        self._base = 0  # position of _tokens[0]
        self._starts: deque[int] = deque()  # position where each stored sequence starts, oldest first
        self._latest: dict[int, int] = {}  # hash of an n-gram -> position after its latest occurrence
        # per order, aligned with _tokens: position after the previous occurrence of the n-gram ending there, or 0
        self._previous = [array("q") for _ in ORDERS]
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
        """Distinct n-grams indexed."""
        return len(self._latest)

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
            for previous in self._previous:
                previous.append(0)
        self._starts.append(self.end)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append `tokens` to the current sequence and index the n-grams that end in them."""
        if not self._starts:
            self.start_sequence()
        store, start, latest = self._tokens, self._starts[-1] - self._base, self._latest
        for token in tokens:
            store.append(int(token))
            end = len(store)
            for n, previous in zip(ORDERS, self._previous, strict=True):
                if end - n < start:
                    previous.append(0)
                    continue
                key = hash(tuple(store[end - n : end]))
                previous.append(latest.get(key, 0))
                latest[key] = self._base + end
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
                    if self._latest.get(key, following) < following:  # no later occurrence survives
                        del self._latest[key]
            cut = following - self._base
            del self._tokens[:cut]
            for previous in self._previous:
                del previous[:cut]
            self._base = following
            self._stored -= len(old)

    def find(self, query: Sequence[int], limit: int = 16) -> Matches:
        """Occurrences of the longest suffix of `query` (up to MAX_MATCH tokens) followed by at least one
        stored token; of the latest `limit` hits of the longest indexed n-gram that has any."""
        for n, previous in zip(reversed(ORDERS), reversed(self._previous), strict=True):
            if n > len(query):
                continue
            position = self._latest.get(hash(tuple(query[-n:])), 0)
            best, starts, seen = 0, [], 0
            while position > self._base and seen <= limit:  # links into evicted sequences end the chain
                seen += 1
                if self.at(position) != SEPARATOR:  # something followed (not the query's own end)
                    length = self._match_length(query, position)
                    if length > best:
                        best, starts = length, [position]
                    elif length == best and length:
                        starts.append(position)
                position = previous[position - 1 - self._base]
            if best:
                return Matches(best, starts[:limit])
        return Matches(0, [])

    def continuation(self, start: int, count: int) -> list[int]:
        """Up to `count` stored tokens from `start` on, ending at the end of their sequence."""
        index = start - self._base
        tokens = self._tokens[index : index + count] if index >= 0 else []
        return tokens[: tokens.index(SEPARATOR)] if SEPARATOR in tokens else tokens

    def _match_length(self, query: Sequence[int], start: int) -> int:
        """How many tokens before `start` equal the end of `query` (at most MAX_MATCH)."""
        store, last = self._tokens, start - 1 - self._base
        limit = min(MAX_MATCH, len(query), last + 1)
        length = 0
        while length < limit and store[last - length] == query[-1 - length]:  # a separator equals no token
            length += 1
        return length
