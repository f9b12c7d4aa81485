"""Model families: which ones export knows, and how to read their configs (the builder reads the
rest in builder/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """What export must know about one `model_type`."""

    name: str
    tested: bool  # covered by the test suite (ONNX logits == PyTorch, greedy parity)
    gemm_projections: bool = False  # projections exported as Gemm (must be rewritten to be quantized)


FAMILIES = {
    f.name: f
    for f in [
        Family("llama", tested=True),
        Family("qwen2", tested=True),
        Family("gpt2", tested=True, gemm_projections=True),
        Family("mistral", tested=True),
        Family("qwen3", tested=True),
        Family("phi3", tested=True),
        Family("gemma", tested=True),
        Family("gemma2", tested=True),
        Family("gemma3_text", tested=True),
        Family("granite", tested=False),
        Family("olmo", tested=False),
    ]
}


def family_of(config: dict[str, Any]) -> Family:
    """The family of a checkpoint's config.json; unknown types may still export through optimum."""
    model_type = config.get("model_type", "")
    return FAMILIES.get(model_type, Family(model_type or "unknown", tested=False))


def max_positions(config: dict[str, Any]) -> int:
    """The longest sequence the model was configured for."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError("config.json names no maximum sequence length (max_position_embeddings / n_positions)")
