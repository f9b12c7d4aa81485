"""Model families: the one registry of what export knows about each `model_type` (which the builder
builds, which the suite tests), and how to read their configs (the builder reads the rest in
builder/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """What export must know about one `model_type`."""

    name: str
    tested: bool  # covered by the test suite (ONNX logits == PyTorch, greedy parity)
    builder: bool = False  # the torch-free builder builds it exactly; the others export through optimum


FAMILIES = {
    f.name: f
    for f in [
        Family("llama", tested=True, builder=True),
        Family("mistral", tested=True, builder=True),
        Family("qwen2", tested=True, builder=True),
        Family("qwen3", tested=True, builder=True),
        Family("phi3", tested=True, builder=True),
        Family("gemma", tested=True, builder=True),
        Family("gemma2", tested=True, builder=True),
        Family("gemma3_text", tested=True, builder=True),
        Family("gpt2", tested=True),
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
