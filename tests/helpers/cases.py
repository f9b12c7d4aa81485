"""The tiny checkpoints the suite exports: families, exporters, shapes and builder corner cases."""

from __future__ import annotations

# (family, exporter) pairs whose graphs are tested against PyTorch and transformers' generate
CASES = [
    ("llama", "optimum"),
    ("qwen2", "optimum"),
    ("gpt2", "optimum"),
    ("llama", "builder"),
    ("mistral", "builder"),
    ("qwen2", "builder"),
    ("qwen3", "builder"),
    ("phi3", "builder"),
    ("gemma", "builder"),
    ("gemma2", "builder"),
    ("gemma3_text", "builder"),
]
CASE_IDS = [f"{family}-{exporter}" for family, exporter in CASES]

# Small heads for the families whose default head_dim is 256, sliding windows short enough that
# test sequences (up to ~50 tokens) run past them, and every feature of a family in use: gemma3 with
# both layer kinds (sliding with their own rope base, global with linear scaling), random norm weights
# (q/k norms included), a query_pre_attn_scalar other than head_dim and final soft-capping; phi3 with
# partial rotary and longrope switching to the long factors at 32 positions.
FAMILY_SHAPES: dict[str, dict] = {
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 4},
    "gemma3_text": {
        "head_dim": 256,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "query_pre_attn_scalar": 64,
        "final_logit_softcapping": 30.0,
        "norm_std": 0.3,
    },
    "mistral": {"sliding_window": 4},
    "phi3": {
        "partial_rotary_factor": 0.75,  # 12 of 16 dims rotate
        "original_max_position_embeddings": 32,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [1.5 + 0.5 * i for i in range(6)],
        },
    },
}
# Builder corner cases, as variants of llama (and of qwen3: its q/k norms on padded heads; gemma3: its vocabulary)
VARIANTS: dict[str, dict] = {
    "": {},
    "head-dim-40": {"hidden": 160, "heads": 4, "kv_heads": 2, "head_dim": 40, "norm_std": 0.3},
    "llama3-rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    },
    "bf16": {"dtype": "bfloat16"},
    "sharded": {"shard_size": "100KB"},
    "tied": {"tie_word_embeddings": True},
    "deep": {"layers": 4},  # inner layers to tap for a fused head's features
    "vocab-262k": {"vocab_size": 262144, "tie_word_embeddings": True},  # Gemma 3's vocabulary
    # what a GGUF can say: Gemma 3 as llama.cpp runs it (every 6th layer global, queries scaled by head_dim, tied);
    # Mistral Nemo-style heads wider than hidden / heads, no window
    "gguf": {"layers": 6, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "tie_word_embeddings": True},
    "wide-heads": {"head_dim": 32, "sliding_window": None},
}
