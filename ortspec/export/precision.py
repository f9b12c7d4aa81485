"""Activation precision of exported graphs: fp32 (the CPU's) or fp16 (GPUs').

On a GPU the CUDA kernels of GroupQueryAttention run in fp16 (or bf16) only, and fp16 halves the KV
cache and the weights' bytes. The conversion is onnxruntime's own (`convert_float_to_float16`):
every float initializer, value and graph input/output becomes fp16, so the KV buffers the runtime
binds are fp16 too (it reads their type from the graph). Quantized weights stay 4/8-bit; only
their scales become fp16. Runs after quantization, which works on fp32 graphs.
"""

from __future__ import annotations

import onnx

DTYPES = ("fp32", "fp16")
KV_DTYPES = {"fp32": "float32", "fp16": "float16"}  # an option's name -> the builder's (and manifest's)


def check_dtype(name: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in fp16, inputs and outputs included (token ids and lengths stay ints)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
