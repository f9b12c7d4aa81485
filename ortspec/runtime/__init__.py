"""The serving runtime: ONNX Runtime, numpy and tokenizers only (no torch, transformers or optimum)."""

from .chat import ChatTemplateError
from .decoder import ContextLengthError
from .manifest import PackageError
from .pipeline import GenerationConfig, GenerationResult, GenerationStats, Pipeline, TextStream, load
from .sampling import SamplingConfig

__all__ = [
    "ChatTemplateError",
    "ContextLengthError",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "PackageError",
    "Pipeline",
    "SamplingConfig",
    "TextStream",
    "load",
]
