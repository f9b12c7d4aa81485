"""One description of a Llama-family decoder, read from any supported family's config.json.

The families differ in a handful of switches (biases, q/k norms, norm offset, embedding scale,
soft-capping, sliding windows, activation, how much of each head rotates and with which tables);
everything else is the same graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..families import FAMILIES

SUPPORTED = tuple(name for name, family in FAMILIES.items() if family.builder)
GEMMAS = ("gemma", "gemma2", "gemma3_text")
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
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over each q/k head
    norm_offset: float = 0.0  # gemma: weights are stored as (scale - 1)
    embed_scale: float = 1.0  # gemma: embeddings * sqrt(hidden)
    attn_scale: float | None = None  # gemma2/3: query_pre_attn_scalar ** -0.5
    attn_softcap: float = 0.0  # gemma2
    final_softcap: float = 0.0  # gemma2 (gemma3 when configured)
    sandwich_norms: bool = False  # gemma2/3: extra norms after attention and after the MLP
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # which layers use the sliding window
    fused_weights: bool = False  # phi3: qkv_proj and gate_up_proj
    rotary_dim: int | None = None  # phi3's partial_rotary_factor: only the first dims of each head rotate
    local_rope_theta: float | None = None  # gemma3: the sliding layers' own rope base (no scaling)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def rotary(self) -> int:
        """Dimensions of each head that rotate (the first ones)."""
        return self.rotary_dim or self.head_dim

    @property
    def long_rope_after(self) -> int | None:
        """Longrope: sequences longer than this use the long factors (and the cache is recomputed then)."""
        if self.rope_scaling and self.rope_scaling["rope_type"] == "longrope":
            return int(self.rope_scaling["original_max_position_embeddings"])
        return None


def _rope_scaling(config: dict[str, Any], rotary: int) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("su", "yarn") and config.get("model_type") == "phi3":
        kind = "longrope"  # transformers' Phi3Config reads these old names as longrope
    if kind in ("default", None):
        return None
    if kind == "longrope" and config.get("model_type") == "phi3":  # phi3's generate recomputes at the switch
        return _longrope(config, scaling, rotary)
    if kind not in ("llama3", "linear", "freq_factors"):  # freq_factors: from GGUF files (rope_freqs)
        raise UnsupportedModelError(
            f"rope scaling {kind!r} is not supported by the builder (llama3, linear, and longrope for phi3, are); "
            "use --exporter optimum"
        )
    return {**scaling, "rope_type": kind}


def _longrope(config: dict[str, Any], scaling: dict[str, Any], rotary: int) -> dict[str, Any]:
    """Longrope's two factor lists, its switch point and attention factor, as transformers derives them."""
    for key in ("short_factor", "long_factor"):
        if len(scaling.get(key) or []) != rotary // 2:
            raise UnsupportedModelError(f"rope_scaling.{key} must hold {rotary // 2} factors (rotary dims / 2)")
    longest = config.get("max_position_embeddings", 4096)
    original = config.get("original_max_position_embeddings")
    factor = longest / original if original else scaling.get("factor", 1.0)
    original = original or longest
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "short_factor": list(scaling["short_factor"]),
        "long_factor": list(scaling["long_factor"]),
        "original_max_position_embeddings": original,
        "attention_factor": float(attention),
    }


def _sliding(config: dict[str, Any], family: str, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = config.get("sliding_window")
    if family in ("gemma2", "gemma3_text"):
        # gemma2 alternates; gemma3 makes every `sliding_window_pattern`-th layer global (transformers' default 6)
        pattern = 2 if family == "gemma2" else config.get("sliding_window_pattern", 6)
        types = config.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
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
    rotary = int(head_dim * config.get("partial_rotary_factor", 1.0))  # transformers' rounding
    if rotary != head_dim and (family != "phi3" or rotary % 2 or rotary <= 0):
        raise UnsupportedModelError(
            f"partial_rotary_factor {config['partial_rotary_factor']} ({rotary} of {head_dim} dims rotate) is built "
            "for phi3 only (an even, positive count); use --exporter optimum"
        )
    if config.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention (an encoder-style Gemma 3) is not a causal LM")
    act_name = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if family == "gemma" and config.get("hidden_activation") is None:
        act_name = "gelu_pytorch_tanh"  # transformers forces the tanh approximation for Gemma
    if act_name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {act_name!r} is not supported by the builder")
    window, sliding_layers = _sliding(config, family, layers)
    gemma = family in GEMMAS
    soft_capped = family == "gemma2"  # gemma3's attention ignores attn_logit_softcapping in transformers
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
        rope_scaling=_rope_scaling(config, rotary),
        max_positions=config.get("max_position_embeddings", 4096),
        tie_embeddings=config.get("tie_word_embeddings", gemma),
        activation=ACTIVATIONS[act_name],
        qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=hidden**0.5 if gemma else 1.0,
        attn_scale=config["query_pre_attn_scalar"] ** -0.5 if family in ("gemma2", "gemma3_text") else None,
        attn_softcap=float(config.get("attn_logit_softcapping") or 0.0) if soft_capped else 0.0,
        final_softcap=float(config.get("final_logit_softcapping") or 0.0) if family in GEMMAS[1:] else 0.0,
        sandwich_norms=family in ("gemma2", "gemma3_text"),
        sliding_window=window,
        sliding_layers=sliding_layers,
        fused_weights=family == "phi3",
        rotary_dim=rotary if rotary != head_dim else None,
        local_rope_theta=config.get("rope_local_base_freq", 10000.0) if family == "gemma3_text" else None,
    )
