"""Export: Hugging Face checkpoints -> ONNX (+ weight-only quantization) -> deployment package.

May use torch, transformers and optimum; the runtime never imports this package.
"""

from .checkpoint import CheckpointError
from .compat import IncompatiblePairError
from .pair import export_pair

__all__ = ["CheckpointError", "IncompatiblePairError", "export_pair"]
