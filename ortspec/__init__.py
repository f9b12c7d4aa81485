"""ortspec: speculative decoding of Hugging Face causal LMs on ONNX Runtime alone."""

from .runtime import ContextLengthError, GenerationResult, GenerationStats, PackageError, Pipeline, load

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "GenerationStats",
    "PackageError",
    "Pipeline",
    "__version__",
    "load",
]
