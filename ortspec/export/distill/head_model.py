"""The draft head in PyTorch, for training: the same computation the ONNX head graph runs.

fc([embedding(x_{j+1}); f_j]) -> one Llama decoder layer -> RMSNorm = predicted f_{j+1}; its scores
over the vocabulary subset come from the target's own (frozen) lm_head rows. The layer starts as a
copy of the target's last layer, and fc starts by passing the features through, so the untrained
head already behaves like "one more target layer".

f_j may be fused (EAGLE-3): the final features, then inner layers' RMS-normalised outputs. Those
parts are scaled to the final features' spread before fc (`input_scale`, folded into fc's saved
weights, so the ONNX graph reads the target's raw output); fc starts reading nothing from them.
The head predicts the final features alone: while drafting, its own predictions stand in for the
final part and the inner parts are zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..builder.config import DecoderConfig
from ..builder.head import HEAD_WEIGHTS

LAYER_PARTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def llama_config(cfg: DecoderConfig) -> Any:
    """A one-layer transformers LlamaConfig of the head's shape."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=1,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_positions,
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "sdpa"
    return config


class FeatureHead(nn.Module):
    """Trainable fc + layer + norm; frozen embedding table and lm_head rows of the vocabulary subset."""

    embedding: torch.Tensor  # buffers (registered in __init__)
    lm_head: torch.Tensor
    input_scale: torch.Tensor

    def __init__(
        self, cfg: DecoderConfig, embedding: np.ndarray, lm_head_rows: np.ndarray, feature_parts: int = 1
    ) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        config = llama_config(cfg)
        hidden = cfg.hidden
        # the graph stores the table in float16: train on exactly the rows it will serve
        table = np.asarray(embedding, np.float16).astype(np.float32)
        self.register_buffer("embedding", torch.from_numpy(table))
        self.register_buffer("lm_head", torch.from_numpy(np.ascontiguousarray(lm_head_rows, np.float32)))  # [K, H]
        self.hidden = hidden
        self.fc = nn.Linear((1 + feature_parts) * hidden, hidden, bias=False)
        self.register_buffer("input_scale", torch.ones(feature_parts * hidden))  # per feature column
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.norm = LlamaRMSNorm(hidden, eps=cfg.rms_eps)
        self.rotary = LlamaRotaryEmbedding(config)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, hidden : 2 * hidden] = torch.eye(hidden)
            self.fc.weight[:, :hidden].normal_(std=0.02)

    def init_from_target(self, layer: dict[str, np.ndarray], final_norm: np.ndarray) -> None:
        """Start from the target's last layer (HF names relative to the layer) and final norm."""
        state = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in layer.items()}
        self.layer.load_state_dict(state)
        with torch.no_grad():
            self.norm.weight.copy_(torch.from_numpy(np.asarray(final_norm, np.float32)))

    def scale_inner_features(self, scale: float) -> None:
        """Bring the inner layers' unit-RMS parts to `scale`, the final features' spread (one noise
        level then fits every part)."""
        with torch.no_grad():
            self.input_scale[self.hidden :] = scale

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] (x_{j+1}), features [B, T, parts x H] (f_j) -> (predicted f_{j+1}, subset scores)."""
        x = self.fc(torch.cat([self.embedding[tokens], features * self.input_scale], dim=-1))
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :].expand(tokens.shape[0], -1)
        h = self.layer(x, attention_mask=None, position_ids=positions, position_embeddings=self.rotary(x, positions))
        if isinstance(h, tuple):
            h = h[0]
        predicted = self.norm(h)
        return predicted, predicted @ self.lm_head.T

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The subset scores the target's lm_head gives features."""
        return features @ self.lm_head.T

    def trained_tensors(self, vocab_subset: np.ndarray) -> dict[str, np.ndarray]:
        """The head's weights under the names the ONNX head builder reads."""
        layer = self.layer.state_dict()
        tensors = {f"model.layers.0.{name}": layer[name] for name in LAYER_PARTS}
        ones = torch.ones(self.hidden, device=self.input_scale.device)
        tensors["fc.weight"] = self.fc.weight * torch.cat([ones, self.input_scale])  # the graph reads raw features
        tensors["model.norm.weight"] = self.norm.weight
        # float16: half the size (a head small enough to ship), and a draft's guesses lose nothing that matters
        out = {k: v.detach().to(torch.float16).contiguous().numpy() for k, v in tensors.items()}
        out["vocab_subset"] = np.asarray(vocab_subset, np.int64)
        return out


def save_head_weights(head: FeatureHead, vocab_subset: np.ndarray, directory: Path) -> Path:
    from safetensors.numpy import save_file

    path = Path(directory) / HEAD_WEIGHTS
    tmp = path.with_name(path.name + ".tmp")
    save_file(head.trained_tensors(vocab_subset), str(tmp))
    tmp.replace(path)
    return path
