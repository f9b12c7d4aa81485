"""The fast path for Llama-family models: ONNX graphs built straight from config.json + safetensors,
or from a GGUF file (llama and qwen2 architectures; weights dequantized to float32).

No PyTorch needed: weights are read with numpy (and the `gguf` package), the graph is written with
onnx.helper, and it uses GroupQueryAttention over a shared, preallocated KV buffer (O(1) rollback
for speculation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from .config import SUPPORTED, DecoderConfig, UnsupportedModelError, decoder_config
from .gguf_io import GGUFCheckpoint, is_gguf
from .graph import build_decoder
from .safetensors_io import Checkpoint
from .weights import WeightReader

DEFAULT_MAX_POSITIONS = 32768  # rotary table rows baked into the graph (the KV buffer is sized at load)

__all__ = ["SUPPORTED", "DecoderConfig", "UnsupportedModelError", "build_onnx", "can_build"]


def can_build(config: dict[str, Any]) -> bool:
    """Whether the builder handles this checkpoint exactly (else export falls back to optimum)."""
    try:
        decoder_config(config)
    except UnsupportedModelError:
        return False
    return True


def build_onnx(
    source: Path | Checkpoint | GGUFCheckpoint, config: dict[str, Any]
) -> tuple[onnx.ModelProto, DecoderConfig, int]:
    """Build the fp32 decoder graph; return it, its config and the positions its rotary table covers.

    `source` is a checkpoint directory (safetensors), a .gguf file, or an opened checkpoint of either kind.
    """
    cfg = decoder_config(config)
    positions = min(cfg.max_positions, DEFAULT_MAX_POSITIONS)
    if isinstance(source, (str, Path)):
        source = GGUFCheckpoint(source) if is_gguf(source) else Checkpoint(Path(source))
    reader = WeightReader(source, cfg)
    return build_decoder(reader, positions), cfg, positions
