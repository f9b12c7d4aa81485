"""The GGUF architectures ortspec reads, as llama.cpp's converter (`convert_hf_to_gguf.py`) writes them.

Per architecture: which Hugging Face model it was converted from, the GGUF name of each layer tensor
and its Hugging Face name, and what the converter did to the weights that must be undone:

- llama (Mistral-style checkpoints are converted as llama too): the q/k rows of each head are
  interleaved for llama.cpp's rotary layout (`LlamaModel.permute`); no other architecture is permuted.
- gemma3: every RMSNorm weight (q/k norms included) is stored as 1 + w, the scale Gemma applies.
- phi3: the fused qkv and gate+up projections stay fused (`attn_qkv`, and `ffn_up` holding gate then up).
- qwen3, gemma3: per-head q/k RMSNorms (`attn_q_norm`, `attn_k_norm`); gemma3: norms after attention
  and after the MLP (`post_attention_norm`, `post_ffw_norm`), its pre-MLP norm under `ffn_norm`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
}
_MLP = {
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_SANDWICH = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_FUSED = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors
LONG_ROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # phi3's longrope factors


@dataclass(frozen=True)
class Architecture:
    """One GGUF `general.architecture` the builder reproduces exactly."""

    name: str
    model_type: str  # the config.json model_type it becomes
    hf_class: str
    layer_tensors: dict[str, str]  # blk.N.<GGUF part> -> model.layers.N.<Hugging Face part>
    extra_tensors: tuple[str, ...] = ()  # global tensors that become config (rope factors), not weights
    permuted: bool = False  # q/k rows interleaved per head by the converter
    norm_shift: float = 0.0  # what the converter added to every norm weight
    fused: bool = False  # attn_qkv and a gate+up ffn_up
    qk_norm: bool = False
    sandwich_norms: bool = False

    @property
    def query_tensor(self) -> str:
        """The first layer's tensor that holds the query projection."""
        return "attn_qkv.weight" if self.fused else "attn_q.weight"


ARCHITECTURES = {
    a.name: a
    for a in [
        Architecture("llama", "llama", "LlamaForCausalLM", _ATTENTION | _MLP, (ROPE_FREQS,), permuted=True),
        Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", _ATTENTION | _MLP, (ROPE_FREQS,)),
        Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", _ATTENTION | _MLP | _QK_NORMS, (ROPE_FREQS,), qk_norm=True),
        Architecture(
            "gemma3",
            "gemma3_text",
            "Gemma3ForCausalLM",
            _ATTENTION | _MLP | _QK_NORMS | _SANDWICH,
            norm_shift=1.0,
            qk_norm=True,
            sandwich_norms=True,
        ),
        Architecture("phi3", "phi3", "Phi3ForCausalLM", _FUSED, LONG_ROPE, fused=True),
    ]
}


def hf_tensor_name(arch: Architecture, gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the builder has no use for it."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in arch.layer_tensors:
        return f"model.layers.{match.group(1)}.{arch.layer_tensors[match.group(2)]}"
    return None


def is_norm(hf_name: str) -> bool:
    """Whether a Hugging Face tensor is an RMSNorm weight (what the converter shifts for Gemma)."""
    return hf_name.endswith("norm.weight")


def layer_shapes(
    arch: Architecture, hidden: int, q: int, kv: int, head_dim: int, ff: int, biased: bool
) -> dict[str, tuple[int, ...]]:
    """The shape ([out, in]) of every tensor of a layer that the builder reads, by GGUF part name."""
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (hidden,),
        "attn_output.weight": (hidden, q),
        "ffn_norm.weight": (hidden,),
        "ffn_down.weight": (hidden, ff),
    }
    if arch.fused:
        shapes |= {"attn_qkv.weight": (q + 2 * kv, hidden), "ffn_up.weight": (2 * ff, hidden)}
    else:
        shapes |= {
            "attn_q.weight": (q, hidden),
            "attn_k.weight": (kv, hidden),
            "attn_v.weight": (kv, hidden),
            "ffn_gate.weight": (ff, hidden),
            "ffn_up.weight": (ff, hidden),
        }
    if biased:
        shapes |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
    if arch.qk_norm:
        shapes |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    if arch.sandwich_norms:
        shapes |= {"post_attention_norm.weight": (hidden,), "post_ffw_norm.weight": (hidden,)}
    return shapes
