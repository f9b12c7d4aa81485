"""The serving runtime: ONNX Runtime, numpy and tokenizers only (no torch, transformers or optimum)."""

from ortspec.runtime.errors import ChatTemplateError, ContextLengthError, PackageError
from ortspec.runtime.options import GenerationConfig
from ortspec.runtime.pipeline import Pipeline, load
from ortspec.runtime.results import GenerationResult, GenerationStats, TextStream
from ortspec.runtime.speculation.sampling import SamplingConfig

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
