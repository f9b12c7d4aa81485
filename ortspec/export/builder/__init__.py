"""The fast path for Llama-family models: ONNX graphs built straight from config.json + safetensors.

No PyTorch needed: weights are read with numpy, the graph is written with onnx.helper, and it uses
GroupQueryAttention over a shared, preallocated KV buffer (O(1) rollback for speculation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from .config import SUPPORTED, DecoderConfig, UnsupportedModelError, decoder_config
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


def build_onnx(checkpoint_dir: Path, config: dict[str, Any]) -> tuple[onnx.ModelProto, DecoderConfig, int]:
    """Build the fp32 decoder graph; return it, its config and the positions its rotary table covers."""
    cfg = decoder_config(config)
    positions = min(cfg.max_positions, DEFAULT_MAX_POSITIONS)
    reader = WeightReader(Checkpoint(checkpoint_dir), cfg)
    return build_decoder(reader, positions), cfg, positions
