"""Random (untrained) draft heads, saved as `ortspec distill` saves one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ortspec.export.builder import weight_reader
from ortspec.export.builder.head import HEAD_CONFIG, HEAD_KIND, head_decoder_config, target_fingerprint
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.distill.head_model import FeatureHead, save_head_weights


def make_head(
    target_dir: Path, out: Path, subset_size: int = 200, seed: int = 0, feature_layers: tuple[int, ...] = ()
) -> Path:
    """A random (untrained) head for `target_dir`, saved as `ortspec distill` saves one; with
    `feature_layers`, one that reads those inner layers too (their parts scaled up before fc)."""
    ckpt = resolve_checkpoint(target_dir)
    reader = weight_reader(ckpt.path, ckpt.config)
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(reader.cfg.vocab_size, subset_size, replace=False))
    torch.manual_seed(seed)
    lm_head = reader.lm_head()[:, subset].T
    head = FeatureHead(head_decoder_config(reader.cfg), reader.embedding(), lm_head, 1 + len(feature_layers))
    head.scale_inner_features(2.5)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out.mkdir(parents=True, exist_ok=True)
    save_head_weights(head, subset, out)
    config = {
        "kind": HEAD_KIND,
        "format": 2,
        "target_fingerprint": target_fingerprint(reader),
        "feature_layers": list(feature_layers),
        "training": {},
    }
    (out / HEAD_CONFIG).write_text(json.dumps(config))
    return out
