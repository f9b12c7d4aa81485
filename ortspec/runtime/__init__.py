"""The serving runtime: ONNX Runtime, numpy and tokenizers only (no torch, transformers or optimum)."""

from .decoder import ContextLengthError
from .manifest import PackageError
from .pipeline import GenerationResult, GenerationStats, Pipeline, TextStream, load

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "GenerationStats",
    "PackageError",
    "Pipeline",
    "TextStream",
    "load",
]
