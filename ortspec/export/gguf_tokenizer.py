"""A `tokenizers` tokenizer.json (+ tokenizer_config.json) from a GGUF file's `tokenizer.ggml.*` metadata.

Encodings follow transformers' own GGUF conversion (`transformers.integrations.ggml`), so a package
made from a GGUF tokenizes like `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, except for gemma3
and phi3, where they follow the models' own tokenizer.json (transformers 4.57 reads Gemma's BPE
vocabulary as Unigram, and Phi-3's without its "▁" normalizer):

- `gpt2` vocabularies (byte-level BPE with merges) of llama-architecture files (SmolLM2, Llama 3):
  the GPT-2 byte-level pre-tokenizer; of qwen2 and qwen3 files: NFC and Qwen2's split pattern.
- `llama` vocabularies (SentencePiece BPE: TinyLlama, Gemma 3, Phi-3): "▁" for spaces, a "▁" prefix
  unless `tokenizer.ggml.add_space_prefix` is false (Gemma's), byte fallback, and merges derived from
  the token scores when the file has none; phi3's special tokens strip the whitespace after them, as
  Phi-3's own tokenizer.json and llama.cpp do.

Where the file says otherwise, the file wins (llama.cpp reads it the same way; transformers 4.57
does not): BOS/EOS are added only when `tokenizer.ggml.add_bos_token`/`add_eos_token` say so (when
the file is silent: BOS for llama and for SentencePiece vocabularies, none for qwen2/qwen3); every
control token is special (transformers hard-codes three for qwen2); user-defined tokens match as whole
tokens; the eos token is the file's eos (transformers labels the bos token as eos). Byte-level text
decodes without stripping a leading space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .builder.gguf_io import GGUFError, GGUFModel

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # llama.cpp's token types
TOKENIZER_MODELS = ("gpt2", "llama")
QWEN_ARCHITECTURES = ("qwen2", "qwen3")  # byte-level BPE with Qwen2's normalizer and split pattern
# Phi-3's SentencePiece vocabulary: its special tokens swallow the whitespace after them (rstrip in Phi-3's
# tokenizer.json, and in llama.cpp), except these
PHI3_UNSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")
# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits, punctuation runs
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class UnsupportedTokenizerError(GGUFError):
    """The GGUF's tokenizer kind is not one ortspec can rebuild exactly."""


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary that lists only scores, ranked as transformers ranks them.

    Every split of a token into two known tokens is a merge; merges are ordered by the merged token's
    score (high first), and within one token by the scores of its two parts (high first). Ties keep
    vocabulary order, then split position.
    """
    score_of = dict(zip(tokens, scores, strict=True))  # a repeated token keeps its first position and last score
    known = set(tokens)
    ranked: list[tuple[str, str, float]] = []
    for token, score in score_of.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in known and token[i:] in known]
        pairs.sort(key=lambda pair: (score_of[pair[0]], score_of[pair[1]]), reverse=True)
        ranked.extend((left, right, score) for left, right in pairs)
    ranked.sort(key=lambda merge: merge[2], reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs, strict=True) if len(p) != 2), None)
    if bad is not None:
        raise GGUFError(f"GGUF merge {bad!r} is not two tokens separated by one space")
    return pairs  # type: ignore[return-value]


def _token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _byte_level(architecture: str, meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges = _file_merges(meta)
    if merges is None:
        raise GGUFError("the GGUF's gpt2 (byte-level BPE) tokenizer has no tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    if architecture in QWEN_ARCHITECTURES:
        tok = Tokenizer(
            models.BPE(
                vocab,
                merges,
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        )
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=False
                ),
            ]
        )
    else:  # llama-architecture files with a GPT-2 style vocabulary (Llama 3, SmolLM2)
        tok = Tokenizer(
            models.BPE(vocab, merges, unk_token=_token(meta, tokens, "unknown"), fuse_unk=True, byte_fallback=True)
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    merges = _file_merges(meta)
    if merges is None:
        if scores is None:
            raise GGUFError("the GGUF's llama (SentencePiece) tokenizer has neither merges nor scores")
        merges = merges_from_scores(tokens, scores)
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(vocab, merges, unk_token=_token(meta, tokens, "unknown"), fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    )
    steps = [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _post_processor(
    add_bos: bool, add_eos: bool, bos: str | None, eos: str | None, meta: dict[str, Any], byte_level: bool
) -> Any:
    specials = []
    for add, token, key in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if add:
            if token is None:
                raise GGUFError(f"the GGUF asks to add a {key} token but names none (tokenizer.ggml.{key}_token_id)")
            specials.append((token, int(meta[f"tokenizer.ggml.{key}_token_id"])))
    if not specials:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None

    def template(sequence: str, type_id: int) -> list[str]:  # a list, so tokens may contain spaces
        return [f"{bos}:{type_id}"] * add_bos + [f"${sequence}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    single, pair = template("A", 0), template("A", 0) + template("B", 1)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def gguf_tokenizer(model: GGUFModel) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer of a GGUF file, and its tokenizer_config.json (special tokens, chat template)."""
    meta = model.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError(f"{model.path.name} has no tokenizer (tokenizer.ggml.model/tokens are missing)")
    if kind not in TOKENIZER_MODELS:
        raise UnsupportedTokenizerError(
            f"{model.path.name}: GGUF tokenizer model {kind!r} is not supported "
            f"(ortspec rebuilds {' and '.join(TOKENIZER_MODELS)} tokenizers)"
        )
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    for key in ("token_type", "scores"):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and len(values) != len(tokens):
            raise GGUFError(f"{model.path.name}: {len(values)} tokenizer.ggml.{key} for {len(tokens)} tokens")
    tok = _byte_level(model.architecture, meta, tokens) if kind == "gpt2" else _sentencepiece(meta, tokens)

    bos, eos = _token(meta, tokens, "bos"), _token(meta, tokens, "eos")
    unk, pad = _token(meta, tokens, "unknown"), _token(meta, tokens, "padding")
    special = [t for t, kind_ in zip(tokens, types, strict=True) if kind_ == CONTROL]
    special += [t for t in (bos, eos, unk) if t is not None and t not in special]
    rstrip = model.architecture == "phi3" and kind == "llama"
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True, rstrip=rstrip and t not in PHI3_UNSTRIPPED) for t in special]
    )
    user = [t for t, kind_ in zip(tokens, types, strict=True) if kind_ == USER_DEFINED]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model.architecture == "llama" or kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(add_bos, add_eos, bos, eos, meta, kind == "gpt2")
    if post is not None:
        tok.post_processor = post

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{model.architecture}.context_length", 0)) or None,
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}


def write_gguf_tokenizer(model: GGUFModel, out_dir: Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json for the GGUF's tokenizer into `out_dir`."""
    tok, config = gguf_tokenizer(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir
