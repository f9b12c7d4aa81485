"""The SentencePiece vocabularies of Gemma 3 and Phi-3 GGUFs tokenize like the models' own tokenizer.json.

llama.cpp's converter stores a SentencePiece model as tokens, scores and token types (no merges), with
`tokenizer.ggml.add_space_prefix` false for Gemma. The references here are built as transformers'
converters build those tokenizer.json files from tokenizer.model (GemmaConverter; LlamaConverter,
legacy, for Phi-3, whose chat tokens strip the whitespace after them), merges by transformers' own
`generate_merges`; transformers' GGUF reader is no reference for these two (it reads Gemma's BPE
vocabulary as Unigram, and Phi-3's without the "▁" normalizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ortspec.export.builder.gguf_io import open_gguf
from ortspec.export.gguf_tokenizer import write_gguf_tokenizer
from ortspec.models.random import CORPUS
from ortspec.runtime.text.tokenizer import TextTokenizer

from helpers.gguf_files import finish

# (leading special tokens with their GGUF types, chat tokens after the pieces, bos, eos, unk, add_space_prefix)
VOCABULARIES = {
    "gemma3": (
        [("<pad>", TokenType.CONTROL), ("<eos>", TokenType.CONTROL), ("<bos>", TokenType.CONTROL),
         ("<unk>", TokenType.UNKNOWN)],
        ["<start_of_turn>", "<end_of_turn>"],
        "<bos>", "<eos>", "<unk>", False,
    ),
    "phi3": (
        [("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL)],
        ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        "<s>", "<|endoftext|>", "<unk>", True,
    ),
}  # fmt: skip
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()",
    "  leading spaces,\ttabs\nand newlines\r\n\n\n   trailing   ",
    "Ünïcödé: 日本語, emoji 🙂, accents éàü",
    "",
    " ",
    "hello  world",
    "<start_of_turn>user\nwrite a stack<end_of_turn>\n<start_of_turn>model\n",
    "<|system|>\nbe brief<|end|>\n<|user|>\n  hello world <|end|>\n<|assistant|>\n",
    "<bos>x<eos> y <s>z</s> <unk> <|endoftext|> w",
]


def sentencepiece_vocabulary(arch: str) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types as the converter stores a SentencePiece BPE model: specials, 256 byte
    tokens, pieces scored by merge rank, then the chat tokens (control, score -1000)."""
    leading, chat, *_ = VOCABULARIES[arch]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])]
    tokens = [t for t, _ in leading] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chat
    scores = [0.0] * (len(leading) + 256) + [-float(i) for i in range(len(pieces))] + [-1000.0] * len(chat)
    types = [int(k) for _, k in leading] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
    return tokens, scores, types + [TokenType.CONTROL] * len(chat)


def write_vocabulary_gguf(path: Path, arch: str) -> Path:
    tokens, scores, types = sentencepiece_vocabulary(arch)
    _, _, bos, eos, unk, prefix = VOCABULARIES[arch]
    writer = GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index(bos))
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_unk_token_id(tokens.index(unk))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if not prefix:
        writer.add_add_space_prefix(False)  # Gemma's; the converter writes nothing for Phi-3
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    return finish(writer, path)


def reference(arch: str) -> Tokenizer:
    """The tokenizer.json transformers' converter makes of the same SentencePiece model."""
    from transformers.convert_slow_tokenizer import generate_merges

    tokens, scores, types = sentencepiece_vocabulary(arch)
    *_, bos, _, unk, prefix = VOCABULARIES[arch]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # LlamaConverter, legacy (Phi-3's tokenizer.json)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    else:  # GemmaConverter
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence(steps)
    controls = [t for t, k in zip(tokens, types, strict=True) if k in (TokenType.CONTROL, TokenType.UNKNOWN)]
    kept = {"<unk>", "<s>", "<|endoftext|>"}  # Phi-3's tokenizer.json: the other specials rstrip
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True, rstrip=prefix and t not in kept) for t in controls]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tok


@pytest.mark.parametrize("arch", sorted(VOCABULARIES))
def test_sentencepiece_gguf_tokenizes_like_the_models_tokenizer_json(arch, tmp_path):
    gguf = write_vocabulary_gguf(tmp_path / f"{arch}.gguf", arch)
    write_gguf_tokenizer(open_gguf(gguf), tmp_path / "tok")
    ours, theirs = TextTokenizer.from_directory(tmp_path / "tok"), reference(arch)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.encode(text) == theirs.encode(text).ids, text
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize(
    ("arch", "ends"), [("gemma3", ["<eos>", "<end_of_turn>"]), ("phi3", ["<|endoftext|>", "<|end|>"])]
)
def test_chat_turn_ends_end_generation(arch, ends, tmp_path):
    """The files name one eos; generation also ends at the token their chats end turns with, as in llama.cpp."""
    tokens, _, _ = sentencepiece_vocabulary(arch)
    eos = open_gguf(write_vocabulary_gguf(tmp_path / f"{arch}.gguf", arch)).special_ids()["eos_token_id"]
    assert eos == [tokens.index(t) for t in ends]
