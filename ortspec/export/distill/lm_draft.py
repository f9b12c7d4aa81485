"""The second kind of draft `distill` makes: a small independent Llama that shares the target's tokenizer.

It learns the target's own text (the chats the target wrote, greedy answers: sequence-level
distillation on on-policy data, plus any local text) by next-token prediction. Unlike a feature
head it needs nothing from the target at serve time, so it drafts for any runtime and provider;
but it reads tokens afresh, so each of its steps costs a larger share of a target step. Its
token embedding starts as the target's, projected onto the target embedding's top principal
directions, so that tokens start where the target puts them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..builder.head import LM_DRAFT_CONFIG
from .train import TrainProgress, native_bf16

LM_STATE_FILE = "lm-train-state.pt"


@dataclass(frozen=True)
class LMShape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768

    @classmethod
    def for_target(cls, target_hidden: int) -> LMShape:
        """At most half the target's width (256 for SmolLM2-135M's 576), heads of 64 (or fewer) dims."""
        hidden = max(16, min(256, target_hidden // 2) // 16 * 16)
        heads = max(1, hidden // 64)
        return cls(hidden, 4, heads, max(1, heads // 2), 3 * hidden)


def lm_config(target_config: dict[str, Any], vocab_size: int, shape: LMShape) -> Any:
    """A LlamaConfig of `shape` with the target's vocabulary, rotary base, norm epsilon and special ids."""
    from transformers import LlamaConfig

    rope_theta = target_config.get("rope_theta") or (target_config.get("rope_parameters") or {}).get("rope_theta")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=int(target_config.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(target_config.get("rms_norm_eps") or 1e-5),
        rope_theta=float(rope_theta or 10000.0),
        tie_word_embeddings=True,
        bos_token_id=target_config.get("bos_token_id"),
        eos_token_id=target_config.get("eos_token_id"),
        pad_token_id=target_config.get("pad_token_id"),
    )


def projected_embedding(embedding: np.ndarray, width: int) -> np.ndarray:
    """The target's token embedding [vocab, hidden] on its top `width` principal directions, scaled to
    unit variance per column: a starting point where similar tokens already lie close."""
    table = np.asarray(embedding, np.float32)
    centered = table - table.mean(0)
    _, _, directions = np.linalg.svd(centered[:: max(1, len(table) // 8192)], full_matrices=False)
    projected = centered @ directions[:width].T
    return (projected / (projected.std(0) + 1e-6) * 0.02).astype(np.float32)


def new_lm(target_config: dict[str, Any], embedding: np.ndarray, shape: LMShape) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(lm_config(target_config, len(embedding), shape))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(projected_embedding(embedding, shape.hidden)))
    return model


def train_lm(
    model: Any,
    sequences: Sequence[np.ndarray],
    seconds: float,
    state_dir: Path,
    chunk: int = 128,
    batch: int = 16,
    lr: float = 2e-3,
    on_step: Callable[[TrainProgress, float], None] = lambda progress, loss: None,
) -> TrainProgress:
    """Next-token training for `seconds` more (resuming from `state_dir`), cosine learning rate over all runs."""
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    progress, state_path = TrainProgress(), Path(state_dir) / LM_STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = state["progress"]
        rng = np.random.default_rng(progress.steps)
    pieces = [(i, s) for i, seq in enumerate(sequences) for s in range(0, max(len(seq) - 1, 0), chunk)]
    if not pieces:
        raise ValueError("no training sequences of two or more tokens")
    earlier, total = progress.seconds, progress.seconds + seconds
    started, bf16 = time.monotonic(), native_bf16()
    model.train()
    while (elapsed := earlier + time.monotonic() - started) < total:
        picked = [pieces[k] for k in rng.integers(0, len(pieces), batch)]
        ids = np.zeros((batch, chunk + 1), np.int64)
        mask = np.zeros((batch, chunk), np.float32)
        for row, (i, start) in enumerate(picked):
            piece = sequences[i][start : start + chunk + 1]
            ids[row, : len(piece)] = piece
            mask[row, : len(piece) - 1] = 1.0
        for group in optimizer.param_groups:
            warm = min(1.0, (progress.steps + 1) / 50)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(elapsed / total, 1.0)))
        x, m = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = (F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none") * m).sum() / m.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.steps += 1
        progress.tokens += int(mask.sum())
        progress.seconds = earlier + time.monotonic() - started
        on_step(progress, float(loss.detach()))
    tmp = state_path.with_name(state_path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress}, tmp)
    tmp.replace(state_path)
    model.eval()
    return progress


@torch.no_grad()
def lm_answer_agreement(model: Any, tokens: Sequence[np.ndarray], starts: Sequence[int]) -> float:
    """Share of answer tokens (from `starts[i]` on) the draft's greedy guess gets right: what γ = 1 accepts,
    since the answers are the target's own greedy output."""
    hits = count = 0
    for ids, start in zip(tokens, starts, strict=True):
        if len(ids) < 2:
            continue
        guesses = model(input_ids=torch.from_numpy(np.asarray(ids[:-1], np.int64))[None]).logits[0].argmax(-1).numpy()
        answer = np.arange(1, len(ids)) >= start
        hits += int((guesses[answer] == np.asarray(ids[1:])[answer]).sum())
        count += int(answer.sum())
    return hits / max(count, 1)


def save_lm(model: Any, tokenizer_dir: Path, out: Path, card: str, training: dict[str, Any]) -> None:
    """A Hugging Face checkpoint `ortspec export TARGET --draft OUT` takes: weights (fp16), config, the
    target's own tokenizer files, a model card."""
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    for file in Path(tokenizer_dir).iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)
    (out / LM_DRAFT_CONFIG).write_text(json.dumps({"kind": "lm", "training": training}, indent=2) + "\n")
    (out / "README.md").write_text(card)
