"""Would the draft head guess more with richer input? An A/B at equal data and steps.

The shipped head reads the target's final features f_j and the next token's embedding. EAGLE-3 feeds its
head a low, a middle and a high layer's outputs instead. This trains two heads the way `ortspec distill`
does (same initialisation, loss, noise, schedule, batch and seed) on the same chats:

- final: fc([embedding; final features]) (the head before fused features);
- fused: fc([embedding; final features; layer LOW; layer MID]), the extra layers RMS-normalised and scaled
  to the final features' spread; fc starts as the final head's, reading nothing from them, and they are
  zeroed at a share of positions as in distill (`TrainConfig.drop`) (distill's default head).

Features come from the Hugging Face checkpoint in PyTorch (bfloat16 autocast), for both heads alike.
Printed: first-draft agreement (what γ = 1 accepts) on the distill run's held-out chats and, with
--bench, on the target's greedy answers to the benchmark's chat prompts (a JSON list of {"tokens",
"prompt_tokens"}).

    python benchmarks/head_features_ab.py --checkpoint HF_DIR --data HEAD_DIR/data [--tokens 500000] \\
        [--steps 2000] [--layers 8 22] [--bench answers.json] [--kinds final,fused]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ortspec.export.builder import weight_reader
from ortspec.export.builder.head import head_decoder_config
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.distill import _layer_tensors, default_feature_layers, vocabulary_subset
from ortspec.export.distill.head_model import FeatureHead
from ortspec.export.distill.train import TrainConfig, _batch, _chunks, answer_agreement, head_losses

Chat = tuple[np.ndarray, int]  # (tokens, where the answer starts)


def newest_chats(store: Path, budget: int) -> list[Chat]:
    """The newest chats of a distill store, up to `budget` tokens."""
    items = [json.loads(line) for line in (store / "items.jsonl").read_text().splitlines()]
    chats, total = [], 0
    for item in reversed(items):
        if total >= budget:
            break
        chats.append((np.asarray(item["tokens"], np.int64), item.get("prompt_tokens", 0)))
        total += len(item["tokens"])
    return chats


@torch.no_grad()
def read_features(model: torch.nn.Module, tokens: np.ndarray, layers: tuple[int, ...]) -> np.ndarray:
    """[len, (1 + len(layers)) * hidden] float16: the final features, then each layer's output RMS-normalised."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = model.model(torch.from_numpy(tokens)[None], output_hidden_states=True).hidden_states
    parts = [states[-1][0].float()]
    for layer in layers:
        h = states[layer][0].float()
        parts.append(h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6))
    return torch.cat(parts, -1).to(torch.float16).numpy()


class Trial:
    """One head kind: which feature columns it reads, training and measurement as `distill` does them."""

    def __init__(self, kind: str, hidden: int, scale: float, head: FeatureHead, drop: float) -> None:
        self.kind, self.hidden, self.scale, self.head, self.drop = kind, hidden, scale, head, drop
        head.scale_inner_features(scale)

    def inputs(self, features: np.ndarray) -> np.ndarray:
        return features[:, : self.hidden] if self.kind == "final" else features

    def loss(self, picked: list, chats: list[Chat], features: list[np.ndarray], config: TrainConfig) -> torch.Tensor:
        """`distill`'s own batch and loss: smooth-L1 on the final features plus KL to the target over the subset."""
        batch = _batch(picked, [ids for ids, _ in chats], [self.inputs(f) for f in features], config.chunk, self.hidden)
        return head_losses(self.head, batch, config.noise, config.kl_weight, self.scale, self.drop)[0]

    def agreement(self, chats: list[Chat], features: list[np.ndarray], subset: np.ndarray) -> float:
        """`distill`'s held-out measure: answer tokens the head guesses reading the target's features (γ = 1)."""
        self.head.eval()
        inputs = [np.asarray(self.inputs(f), np.float32) for f in features]
        share = answer_agreement(self.head, subset, [ids for ids, _ in chats], inputs, [start for _, start in chats])
        self.head.train()
        return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the target's Hugging Face checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="a distill run's data directory")
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--layers", type=int, nargs="+", help="default: distill's (8 22 of 30 layers)")
    parser.add_argument("--bench", type=Path, help="JSON list of {tokens, prompt_tokens}: more held-out answers")
    parser.add_argument("--kinds", default="final,fused")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = tuple(args.layers or default_feature_layers(AutoConfig.from_pretrained(args.checkpoint).num_hidden_layers))

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    train = newest_chats(args.data / "chats", args.tokens)
    measured = {"held-out": newest_chats(args.data / "held-out", 10**9)}
    if args.bench:
        measured["bench chats"] = [
            (np.asarray(c["tokens"]), c["prompt_tokens"]) for c in json.loads(args.bench.read_text())
        ]
    began = time.time()
    features = [read_features(model, ids, layers) for ids, _ in train]
    measured_features = {
        name: [read_features(model, ids, layers) for ids, _ in chats] for name, chats in measured.items()
    }
    print(f"features of {sum(len(ids) for ids, _ in train):,} tokens in {time.time() - began:.0f} s", flush=True)

    checkpoint = resolve_checkpoint(args.checkpoint)
    reader = weight_reader(checkpoint.path, checkpoint.config)
    cfg, config = reader.cfg, TrainConfig(seconds=0)
    subset, _ = vocabulary_subset([ids.tolist() for ids, _ in train], 4096, cfg.vocab_size)
    scale = float(np.concatenate([f[:64, : cfg.hidden].astype(np.float32) for f in features[:256]]).std())
    chunks = _chunks([len(ids) for ids, _ in train], config.chunk)
    for kind in args.kinds.split(","):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        parts = 1 + len(layers) if kind == "fused" else 1
        head = FeatureHead(head_decoder_config(cfg), reader.embedding(), reader.lm_head()[:, subset].T, parts)
        head.init_from_target(_layer_tensors(reader, cfg.layers - 1), reader.final_norm())
        trial = Trial(kind, cfg.hidden, scale, head, config.drop if kind == "fused" else 0.0)
        params = [p for p in head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
        order, cursor, began = rng.permutation(len(chunks)), 0, time.time()
        for step in range(args.steps):
            if cursor + config.batch > len(order):
                order, cursor = rng.permutation(len(chunks)), 0
            picked = [chunks[k] for k in order[cursor : cursor + config.batch]]
            cursor += config.batch
            warm = min(1.0, (step + 1) / config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = trial.loss(picked, train, features, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if (step + 1) % max(args.steps // 4, 1) == 0:
                scores = ", ".join(
                    f"{name} {trial.agreement(measured[name], measured_features[name], subset):.3f}"
                    for name in measured
                )
                print(f"{kind} (layers {layers if kind == 'fused' else '-'}) step {step + 1}: {scores} "
                      f"({time.time() - began:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
