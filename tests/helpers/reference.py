"""PyTorch/transformers references for the exactness tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np


@cache
def hf_model(checkpoint_dir: Path):
    import torch
    import transformers

    # fp32 whatever the checkpoint's dtype; eager attention, which honours soft-capping exactly
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def longrope_switch(checkpoint_dir: Path) -> int | None:
    """Longrope (Phi-3): sequences longer than this rotate with the long factors."""
    config = hf_model(checkpoint_dir).config
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    return getattr(config, "original_max_position_embeddings", None)


def hf_logits(checkpoint_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits [len(ids), vocab] as generation sees them: row j from the sequence ids[: j + 1].

    One forward gives them all, except for longrope: sequences up to the switch point rotate with the
    short factors (and the cache is recomputed with the long ones once the sequence grows past it).
    """
    import torch

    model = hf_model(checkpoint_dir)
    switch = longrope_switch(checkpoint_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        if switch and len(ids) > switch:
            logits[:switch] = model(torch.tensor([ids[:switch]])).logits[0].float().numpy()
    return logits


def _generate(checkpoint_dir: Path, prompt: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model(checkpoint_dir).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=1,
            min_new_tokens=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_greedy(checkpoint_dir: Path, prompt: tuple[int, ...], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """transformers' own greedy `generate` (the new tokens, eos included when it stopped there).

    Longrope models generate in two calls, split where the sequence outgrows the short factors:
    transformers 4.57's Phi-3 drops its cache there to recompute it with the long factors, but builds
    that step's causal mask from a stale cache_position (one query row), so the recomputed keys see
    later tokens; the second call's prefill recomputes them as intended.
    """
    prompt, switch = list(prompt), longrope_switch(checkpoint_dir)
    if not switch or len(prompt) > switch or len(prompt) + max_new_tokens <= switch + 1:
        return _generate(checkpoint_dir, prompt, max_new_tokens, eos_token_id)
    short = _generate(checkpoint_dir, prompt, switch + 1 - len(prompt), eos_token_id)  # from sequences <= switch
    if short[-1] == eos_token_id:
        return short
    return short + _generate(checkpoint_dir, prompt + short, max_new_tokens - len(short), eos_token_id)


def greedy_margin(checkpoint_dir: Path, prompt: list[int], new_tokens: list[int]) -> float:
    """Smallest top-1 minus top-2 logit over the positions that chose `new_tokens`.

    A comparison of greedy outputs only means something when this is well above the numeric
    noise between implementations (~1e-5 for fp32).
    """
    logits = hf_logits(checkpoint_dir, prompt + new_tokens[:-1])[len(prompt) - 1 :]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())
