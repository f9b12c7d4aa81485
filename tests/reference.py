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


def hf_greedy(checkpoint_dir: Path, prompt: tuple[int, ...], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """transformers' own greedy `generate` (the new tokens, eos included when it stopped there)."""
    import torch

    ids = torch.tensor([list(prompt)])
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


def greedy_margin(checkpoint_dir: Path, prompt: list[int], new_tokens: list[int]) -> float:
    """Smallest top-1 minus top-2 logit over the positions that chose `new_tokens`.

    A comparison of greedy outputs only means something when this is well above the numeric
    noise between implementations (~1e-5 for fp32).
    """
    import torch

    ids = torch.tensor([prompt + new_tokens[:-1]])
    with torch.no_grad():
        logits = hf_model(checkpoint_dir)(ids).logits[0, len(prompt) - 1 :].numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())
