"""One description of a Llama-family decoder, read from any supported family's config.json.

The families differ in a handful of switches (biases, q/k norms, norm offset, embedding scale,
soft-capping, sliding windows, activation); everything else is the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class UnsupportedModelError(ValueError):
    """The checkpoint uses a feature the builder cannot reproduce exactly."""


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_positions: int
    tie_embeddings: bool
    activation: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over each q/k head
    norm_offset: float = 0.0  # gemma: weights are stored as (scale - 1)
    embed_scale: float = 1.0  # gemma: embeddings * sqrt(hidden)
    attn_scale: float | None = None  # gemma2: query_pre_attn_scalar ** -0.5
    attn_softcap: float = 0.0  # gemma2
    final_softcap: float = 0.0  # gemma2
    sandwich_norms: bool = False  # gemma2: extra norms after attention and after the MLP
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # which layers use the sliding window
    fused_weights: bool = False  # phi3: qkv_proj and gate_up_proj

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None):
        return None
    if kind not in ("llama3", "linear", "freq_factors"):  # freq_factors: from GGUF files (rope_freqs)
        raise UnsupportedModelError(
            f"rope scaling {kind!r} is not supported by the builder (llama3 and linear are); use --exporter optimum"
        )
    return {**scaling, "rope_type": kind}


def _sliding(config: dict[str, Any], family: str, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = config.get("sliding_window")
    if family == "gemma2":
        types = config.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ]
        return window, tuple(t == "sliding_attention" for t in types)
    if family in ("mistral", "qwen2", "qwen3", "phi3") and window:
        use = config.get("use_sliding_window", family in ("mistral", "phi3"))
        if not use:
            return None, ()
        if family in ("qwen2", "qwen3"):
            start = config.get("max_window_layers", layers)
            return window, tuple(i >= start for i in range(layers))
        return window, tuple(True for _ in range(layers))
    return None, ()


def decoder_config(config: dict[str, Any]) -> DecoderConfig:
    """Normalise a checkpoint's config.json, refusing what cannot be built exactly."""
    family = config.get("model_type", "")
    if family not in SUPPORTED:
        raise UnsupportedModelError(
            f"model type {family!r} is not built by the builder (it builds {', '.join(SUPPORTED)})"
        )
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            "partial rotary embeddings are not supported by the builder; use --exporter optimum"
        )
    act_name = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if family == "gemma" and config.get("hidden_activation") is None:
        act_name = "gelu_pytorch_tanh"  # transformers forces the tanh approximation for Gemma
    if act_name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {act_name!r} is not supported by the builder")
    window, sliding_layers = _sliding(config, family, layers)
    gemma = family in ("gemma", "gemma2")
    return DecoderConfig(
        family=family,
        vocab_size=config["vocab_size"],
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate=config["intermediate_size"],
        rms_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(config),
        max_positions=config.get("max_position_embeddings", 4096),
        tie_embeddings=config.get("tie_word_embeddings", gemma),
        activation=ACTIVATIONS[act_name],
        qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=hidden**0.5 if gemma else 1.0,
        attn_scale=config["query_pre_attn_scalar"] ** -0.5 if family == "gemma2" else None,
        attn_softcap=float(config.get("attn_logit_softcapping") or 0.0) if family == "gemma2" else 0.0,
        final_softcap=float(config.get("final_logit_softcapping") or 0.0) if family == "gemma2" else 0.0,
        sandwich_norms=family == "gemma2",
        sliding_window=window,
        sliding_layers=sliding_layers,
        fused_weights=family == "phi3",
    )
