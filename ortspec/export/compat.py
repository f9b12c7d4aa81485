"""Can this draft serve this target? Same strings must map to the same ids; logits must line up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

PROBE_TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()",
    "  leading spaces,\ttabs\nand newlines\r\n",
    "Ünïcödé: 日本語, emoji 🙂, accents éàü",
]


class IncompatiblePairError(ValueError):
    """The draft tokenizes differently from the target, so its proposals would mean other text."""


@dataclass(frozen=True)
class PairCompatibility:
    """The checked facts about a pair that the manifest records."""

    tokenizer_size: int
    target_vocab_size: int
    draft_vocab_size: int

    @property
    def shared_vocab_size(self) -> int:
        """Logit columns both models have: the range the draft proposes from."""
        return min(self.target_vocab_size, self.draft_vocab_size)


def _first_vocab_difference(target: Tokenizer, draft: Tokenizer) -> str | None:
    t_vocab = {i: tok for tok, i in target.get_vocab(with_added_tokens=True).items()}
    d_vocab = {i: tok for tok, i in draft.get_vocab(with_added_tokens=True).items()}
    for i in sorted(t_vocab.keys() | d_vocab.keys()):
        if t_vocab.get(i) != d_vocab.get(i):
            return f"token id {i} is {t_vocab.get(i)!r} for the target but {d_vocab.get(i)!r} for the draft"
    return None


def _first_special_difference(target: Tokenizer, draft: Tokenizer) -> str | None:
    t_added = {i: (t.content, t.special) for i, t in target.get_added_tokens_decoder().items()}
    d_added = {i: (t.content, t.special) for i, t in draft.get_added_tokens_decoder().items()}
    for i in sorted(t_added.keys() | d_added.keys()):
        if t_added.get(i) != d_added.get(i):
            return (
                f"added token id {i} is {t_added.get(i)!r} (content, special) for the target but "
                f"{d_added.get(i)!r} for the draft"
            )
    return None


def _first_encoding_difference(target: Tokenizer, draft: Tokenizer) -> str | None:
    for text in PROBE_TEXTS:
        t_ids, d_ids = target.encode(text).ids, draft.encode(text).ids
        if t_ids != d_ids:
            at = next((i for i, (a, b) in enumerate(zip(t_ids, d_ids, strict=False)) if a != b), len(t_ids))
            return (
                f"{text[:30]!r}... encodes differently from token {at} on "
                f"(target {t_ids[at : at + 3]}, draft {d_ids[at : at + 3]})"
            )
    return None


def check_pair(
    target_tokenizer_dir: Path, draft_tokenizer_dir: Path, target_vocab_size: int, draft_vocab_size: int
) -> PairCompatibility:
    """Refuse a draft whose tokenizer differs from the target's, naming the first difference.

    Tokenizers are compared by what they do (vocabulary, special tokens, encodings), not by file
    bytes. Embedding sizes may differ by padding rows, as long as every real token fits in both.
    """
    target = Tokenizer.from_file(str(target_tokenizer_dir / "tokenizer.json"))
    draft = Tokenizer.from_file(str(draft_tokenizer_dir / "tokenizer.json"))
    for find in (_first_vocab_difference, _first_special_difference, _first_encoding_difference):
        difference = find(target, draft)
        if difference:
            raise IncompatiblePairError(
                f"the draft's tokenizer is not the target's: {difference}. Use a draft from the same "
                "model family that shares the target's tokenizer."
            )
    size = target.get_vocab_size(with_added_tokens=True)
    for role, rows in (("target", target_vocab_size), ("draft", draft_vocab_size)):
        if rows < size:
            raise IncompatiblePairError(
                f"the {role} model has {rows} vocabulary rows but its tokenizer has {size} tokens"
            )
    return PairCompatibility(size, target_vocab_size, draft_vocab_size)
