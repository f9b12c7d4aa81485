"""Train a draft head on the target's features, within a wall-clock budget, resumably.

Each example is a chunk of one sequence: the head reads pairs (f_j, x_{j+1}) and must predict f_{j+1}
(smooth L1, in units of the features' spread) and the target's next-token distribution over the
vocabulary subset (KL). While drafting, the head reads its own predictions instead of the target's
features, so the features it reads in training are perturbed with noise (as EAGLE does). Chunks are
as long as the context the runtime gives the head (its catch-up window), so training sees what
serving sees. A head that reads inner layers too sees them zeroed at a share of positions (`drop`), as
while drafting past the first token, where its own prediction stands in for the final features
alone. The learning rate follows the budget: warm-up, then cosine decay to the deadline.
Where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX), the forward and backward passes run
under bfloat16 autocast with float32 weights and optimizer: 2.3x the steps per minute on this
project's 2-core machine, and training, not data, bounds what a time budget buys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .head_model import FeatureHead

STATE_FILE = "train-state.pt"


@dataclass
class TrainConfig:
    seconds: float
    chunk: int = 96
    batch: int = 16
    lr: float = 5e-4
    warmup_steps: int = 50
    noise: float = 0.2  # uniform feature noise, in units of the features' standard deviation
    drop: float = 0.2  # share of positions whose inner-layer features are zeroed (fused heads)
    kl_weight: float = 1.0
    save_every: float = 60.0  # seconds between checkpoints
    seed: int = 0
    bf16: bool | None = None  # bfloat16 autocast; None: where the CPU has native bfloat16 arithmetic
    max_steps: int | None = None  # stop after this many steps in all, if that comes before the time is up


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (elsewhere autocast would emulate it, slower than float32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class TrainProgress:
    """What a run has done so far (saved with the checkpoint)."""

    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0


def _chunks(lengths: Sequence[int], chunk: int) -> list[tuple[int, int, int]]:
    """(sequence, start, pairs) covering every training pair (f_j, x_{j+1}) with a target f_{j+1}."""
    out = []
    for i, length in enumerate(lengths):
        pairs = length - 1  # j = 0 .. length-2
        for start in range(0, pairs, chunk):
            out.append((i, start, min(chunk, pairs - start)))
    return out


def _batch(
    chunks: Sequence[tuple[int, int, int]],
    tokens: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    chunk: int,
    hidden: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens x_{j+1} [B, T], features f_j [B, T, parts x H], targets: final features f_{j+1} [B, T, H],
    mask [B, T])."""
    b = len(chunks)
    x = np.zeros((b, chunk), np.int64)
    f_in = np.zeros((b, chunk, features[0].shape[1]), np.float32)
    f_out = np.zeros((b, chunk, hidden), np.float32)
    mask = np.zeros((b, chunk), np.float32)
    for row, (i, start, n) in enumerate(chunks):
        x[row, :n] = tokens[i][start + 1 : start + 1 + n]
        f_in[row, :n] = features[i][start : start + n]
        f_out[row, :n] = features[i][start + 1 : start + 1 + n, :hidden]
        mask[row, :n] = 1.0
    return torch.from_numpy(x), torch.from_numpy(f_in), torch.from_numpy(f_out), torch.from_numpy(mask)


def head_losses(
    head: FeatureHead,
    batch: tuple[torch.Tensor, ...],
    noise: float,
    kl_weight: float,
    scale: float,
    drop: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """(loss, top-1 agreement with the target over the subset) of one batch."""
    x, f_in, f_out, mask = batch
    if noise:  # `scale` units after the head's input scaling, for every part alike
        f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * noise * scale / head.input_scale
    if drop and f_in.shape[-1] > head.hidden:
        kept = (torch.rand(*f_in.shape[:-1], 1) >= drop).to(f_in.dtype)
        f_in = torch.cat([f_in[..., : head.hidden], f_in[..., head.hidden :] * kept], -1)
    predicted, scores = head(x, f_in)
    count = mask.sum().clamp(min=1)
    regression = (F.smooth_l1_loss(predicted / scale, f_out / scale, reduction="none").mean(-1) * mask).sum() / count
    target_scores = head.scores(f_out)
    target_logp = F.log_softmax(target_scores, -1)
    kl = (target_logp.exp() * (target_logp - F.log_softmax(scores, -1))).sum(-1)
    kl = (kl * mask).sum() / count
    agree = ((scores.argmax(-1) == target_scores.argmax(-1)).float() * mask).sum() / count
    return regression + kl_weight * kl, float(agree)


def train_head(
    head: FeatureHead,
    tokens: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    config: TrainConfig,
    state_dir: Path,
    on_step: Callable[[TrainProgress, float, float], None] = lambda progress, loss, agree: None,
) -> TrainProgress:
    """Train `head` for `config.seconds` more, continuing from the checkpoint in `state_dir` if any."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    progress = TrainProgress()
    chunks = _chunks([len(t) for t in tokens], config.chunk)
    if not chunks:
        raise ValueError("no training sequences of two or more tokens")
    sample = np.concatenate([np.asarray(f[:64, : head.hidden], np.float32) for f in features[:256]])
    scale = float(sample.std()) or 1.0
    head.scale_inner_features(scale)
    state_path = Path(state_dir) / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        saved = state["head"]
        saved.setdefault("input_scale", head.input_scale)  # saved before heads read inner layers
        head.load_state_dict(saved)  # a resumed head keeps the input scale it began with
        optimizer.load_state_dict(state["optimizer"])
        progress = state["progress"]
        rng = np.random.default_rng(config.seed + progress.steps)
    order = rng.permutation(len(chunks))
    earlier, total = progress.seconds, progress.seconds + config.seconds  # the schedule spans all runs
    cursor, started, last_save = 0, time.monotonic(), time.monotonic()
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    head.train()
    while True:
        elapsed = earlier + time.monotonic() - started
        if elapsed >= total or (config.max_steps is not None and progress.steps >= config.max_steps):
            break
        if cursor + config.batch > len(order):
            order, cursor = rng.permutation(len(chunks)), 0
        picked = [chunks[k] for k in order[cursor : cursor + config.batch]]
        cursor += config.batch
        warm = min(1.0, (progress.steps + 1) / config.warmup_steps)
        lr = config.lr * warm * 0.5 * (1 + math.cos(math.pi * min(elapsed / total, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            batch = _batch(picked, tokens, features, config.chunk, head.hidden)
            loss, agree = head_losses(head, batch, config.noise, config.kl_weight, scale, config.drop)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.steps += 1
        progress.tokens += sum(n for _, _, n in picked)
        progress.seconds = earlier + time.monotonic() - started
        on_step(progress, float(loss.detach()), agree)
        if time.monotonic() - last_save >= config.save_every:
            save_state(head, optimizer, progress, state_path)
            last_save = time.monotonic()
    save_state(head, optimizer, progress, state_path)
    head.eval()
    return progress


def save_state(head: FeatureHead, optimizer: torch.optim.Optimizer, progress: TrainProgress, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress}, tmp)
    tmp.replace(path)


@torch.no_grad()
def answer_agreement(
    head: FeatureHead,
    subset: np.ndarray,
    tokens: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    starts: Sequence[int],
) -> float:
    """Share of answer tokens (from `starts[i]` on) the head guesses right, reading the target's features:
    what γ = 1 would accept, since the answers are the target's own greedy output."""
    hits = count = 0
    for ids, feats, start in zip(tokens, features, starts, strict=True):
        if len(ids) < 3:
            continue
        _, scores = head(torch.from_numpy(ids[1:-1])[None], torch.from_numpy(np.asarray(feats[:-2], np.float32))[None])
        guesses = subset[scores[0].argmax(-1).numpy()]  # the guesses of ids[2:]
        answer = np.arange(2, len(ids)) >= start
        hits += int((guesses[answer] == ids[2:][answer]).sum())
        count += int(answer.sum())
    return hits / max(count, 1)
