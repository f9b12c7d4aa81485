"""Shared fixtures: tiny random checkpoints and the packages exported from them (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ortspec.models.random import make_checkpoint, perturbed_copy

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
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """checkpoint(family, kind, variant) -> directory. kind: target | same (copy) | close (perturbed) | other."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(family: str = "llama", kind: str = "target", variant: str = "") -> Path:
        key = (family, kind, variant)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}-{kind}-{variant or 'base'}")
            shape = {**FAMILY_SHAPES.get(family, {}), **VARIANTS[variant]}
            if kind == "target":
                made[key] = make_checkpoint(root, family, seed=0, **shape)
            elif kind == "same":
                made[key] = perturbed_copy(get(family, variant=variant), root, noise=0.0)
            elif kind == "close":
                made[key] = perturbed_copy(get(family, variant=variant), root, noise=0.05)
            elif kind == "other":
                made[key] = make_checkpoint(root, family, seed=7, layers=1, **shape)
            else:
                raise ValueError(kind)
        return made[key]

    return get


@pytest.fixture(scope="session")
def package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """package(family, draft kind or None, quantize, exporter, draft_exporter, variant) -> package directory."""
    from ortspec.export import export_pair

    made: dict[tuple, Path] = {}

    def get(
        family: str = "llama",
        draft: str | None = "close",
        quantize: str = "none",
        exporter: str = "auto",
        draft_exporter: str | None = None,
        variant: str = "",
    ) -> Path:
        key = (family, draft, quantize, exporter, draft_exporter, variant)
        if key not in made:
            out = tmp_path_factory.mktemp("pkg") / "-".join(str(k) for k in key)
            export_pair(
                checkpoint(family, variant=variant),
                out,
                draft=checkpoint(family, draft, variant) if draft else None,
                quantize=quantize,
                exporter=exporter,
                draft_exporter=draft_exporter,
                report=lambda _: None,
            )
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def chat_package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama pair (draft "close") with a chat template in its tokenizer: the server's tests."""
    import json
    import shutil

    from ortspec.export import export_pair

    root = tmp_path_factory.mktemp("chat-pkg")
    source = root / "checkpoint"
    shutil.copytree(checkpoint("llama"), source)
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    export_pair(source, root / "tiny-chat", draft=checkpoint("llama", "close"), quantize="none", report=lambda _: None)
    return root / "tiny-chat"
