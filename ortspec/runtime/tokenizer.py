"""Text <-> token ids with the `tokenizers` library, and incremental detokenisation for streaming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """The package's tokenizer: encode prompts the way `transformers` does, decode without specials."""

    def __init__(self, directory: Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer's post-processor adds (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens (eos, ...) left out."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stream(self) -> TextStreamDecoder:
        """A fresh incremental decoder for one generation."""
        return TextStreamDecoder(self._tokenizer)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


class TextStreamDecoder:
    """Turns token ids, as they arrive, into text deltas that never end inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` complete ("" while a character is still incomplete)."""
        pieces = (self._stream.step(self._tokenizer, int(t)) for t in token_ids)
        return "".join(p for p in pieces if p)
