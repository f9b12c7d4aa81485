"""The fast path for Llama-family models: ONNX graphs built straight from config.json + safetensors,
or from a GGUF file (llama, qwen2, qwen3, gemma3 and phi3 architectures; weights dequantized to float32).

No PyTorch needed: weights are read with numpy (and the `gguf` package), the graph is written with
onnx.helper, and it uses GroupQueryAttention over a shared, preallocated KV buffer (O(1) rollback
for speculation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .config import SUPPORTED, DecoderConfig, UnsupportedModelError, decoder_config
from .gguf_io import GGUFCheckpoint, is_gguf
from .graph import GraphBuilder, build_decoder
from .head import build_head, read_head_config, target_fingerprint
from .safetensors_io import SafetensorsCheckpoint
from .weights import WeightReader

DEFAULT_MAX_POSITIONS = 32768  # rotary table rows baked into the graph (the KV buffer is sized at load)

__all__ = [
    "SUPPORTED",
    "DecoderConfig",
    "GraphBuilder",
    "UnsupportedModelError",
    "build_head_onnx",
    "build_onnx",
    "can_build",
]


def can_build(config: dict[str, Any]) -> bool:
    """Whether the builder handles this checkpoint exactly (else export falls back to optimum)."""
    try:
        decoder_config(config)
    except UnsupportedModelError:
        return False
    return True


def weight_reader(source: Path | SafetensorsCheckpoint | GGUFCheckpoint, config: dict[str, Any]) -> WeightReader:
    """The builder's view of a checkpoint's weights: a safetensors directory, a .gguf file, or either opened."""
    if isinstance(source, (str, Path)):
        source = GGUFCheckpoint(source) if is_gguf(source) else SafetensorsCheckpoint(Path(source))
    return WeightReader(source, decoder_config(config))


def build_onnx(
    source: Path | SafetensorsCheckpoint | GGUFCheckpoint,
    config: dict[str, Any],
    feature_layers: Sequence[int] = (),
    graph: GraphBuilder | None = None,
) -> tuple[onnx.ModelProto, DecoderConfig, int]:
    """Build the decoder graph; return it, its config and the positions its rotary table covers.
    `feature_layers`: inner layers whose output hidden_states also carries (what a fused draft head reads).
    `graph`: a builder that writes the weights to external data (and quantizes them) as they come; by
    default, an fp32 graph with its weights inside."""
    reader = weight_reader(source, config)
    positions = min(reader.cfg.max_positions, DEFAULT_MAX_POSITIONS)
    return build_decoder(reader, positions, feature_layers, graph), reader.cfg, positions


def build_head_onnx(
    head_dir: Path, target: Path | SafetensorsCheckpoint | GGUFCheckpoint, target_config: dict[str, Any]
) -> tuple[onnx.ModelProto, int]:
    """Build a draft head's graph for its target, refusing a head trained for another model."""
    reader = weight_reader(target, target_config)
    expected = read_head_config(head_dir).get("target_fingerprint")
    if expected != target_fingerprint(reader):
        raise UnsupportedModelError(
            f"the draft head in {head_dir} was trained for another target (fingerprint {expected}, this target's "
            f"is {target_fingerprint(reader)}); distill a head for it with `ortspec distill`"
        )
    positions = min(reader.cfg.max_positions, DEFAULT_MAX_POSITIONS)
    return build_head(Path(head_dir), reader, positions), positions
