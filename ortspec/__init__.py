"""ortspec: speculative decoding of Hugging Face causal LMs on ONNX Runtime alone."""

from .runtime import (
    ChatTemplateError,
    ContextLengthError,
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    PackageError,
    Pipeline,
    TextStream,
    load,
)

__version__ = "0.1.0"

__all__ = [
    "ChatTemplateError",
    "ContextLengthError",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "PackageError",
    "Pipeline",
    "TextStream",
    "__version__",
    "load",
]
