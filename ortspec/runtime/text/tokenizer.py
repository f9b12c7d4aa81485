"""Text <-> token ids with the `tokenizers` library, and incremental detokenisation for streaming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ortspec.runtime.errors import PackageError
from ortspec.runtime.package.json_file import read_json
from ortspec.runtime.package.manifest import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _special_tokens(config_path: Path | None) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json (chat templates use them)."""
    config = read_json(config_path, PackageError) if config_path else {}
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


class TextTokenizer:
    """The package's tokenizer: encode prompts the way `transformers` does, decode without specials.

    It reads exactly the files it is given (the manifest's checked ones): `tokenizer.json`, and
    `tokenizer_config.json` when there is one.
    """

    def __init__(self, tokenizer_file: Path, config_file: Path | None = None) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise PackageError(f"{tokenizer_file} is not a valid tokenizer ({exc}); the package is corrupted") from exc
        self.special_tokens = _special_tokens(config_file)

    @classmethod
    def from_directory(cls, directory: Path) -> TextTokenizer:
        """The tokenizer saved in `directory` (outside a package, e.g. one just converted)."""
        config = Path(directory) / TOKENIZER_CONFIG_FILE
        return cls(Path(directory) / TOKENIZER_FILE, config if config.is_file() else None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, by default with the special tokens the post-processor adds (e.g. BOS)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens (eos, ...) left out."""
        text: str = self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    def stream(self) -> TextStreamDecoder:
        """A fresh incremental decoder for one generation."""
        return TextStreamDecoder(self._tokenizer)

    def __len__(self) -> int:
        size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        return size


class TextStreamDecoder:
    """Turns token ids, as they arrive, into text deltas that never end inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` complete ("" while a character is still incomplete)."""
        self._ids.extend(int(t) for t in token_ids)
        pieces = (self._stream.step(self._tokenizer, int(t)) for t in token_ids)
        text = "".join(p for p in pieces if p)
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """At the end: whatever the held-back bytes decode to (a replacement character for a cut
        one), so that all pieces together equal a one-shot decode of every id."""
        full: str = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest


class TextAssembler:
    """Builds the output text token by token, cutting it at the first stop string.

    `delta()` returns only text that can no longer turn into a stop string, so a stop string (and
    anything after it) is never streamed; the concatenated deltas always equal `text`.
    """

    def __init__(self, decoder: TextStreamDecoder, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stops = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False
        self._emitted = 0

    def push(self, token_id: int) -> bool:
        """Add one token; True when it completed a stop string (the text then ends before it)."""
        return self._add(self._decoder.push([token_id]))

    def finish(self) -> None:
        """The generation ended: take in any text the decoder still held back."""
        if not self.stopped:
            self._add(self._decoder.flush())

    def _add(self, piece: str) -> bool:
        if not piece or self.stopped:
            return self.stopped
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _held_back(self) -> int:
        """Length of the longest text suffix that is the start of a stop string."""
        if self.stopped:
            return 0
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self._stops):
                return k
        return 0

    def delta(self, final: bool = False) -> str:
        """New text safe to show (all of it when `final`)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece
