"""Weight-only quantization to MatMulNBits / GatherBlockQuantized blocks (int4/int8, symmetric).

`proto.quantize_weights` quantizes a whole ONNX graph (optimum's exports, heads, fp16 packages);
`streaming.StreamingQuantizer` quantizes the builder's weights one at a time while the graph is built.
Both keep GGUF block weights with their own codes and write the same nodes (`nodes`): the streaming one reads
them from the file's bytes (`gguf_raw`), the whole-graph one finds them in fp32 weights (`gguf_blocks`).
"""

from .nodes import count_ops, dequantized_weight
from .proto import quantize_weights

BITS = {"none": None, "int8": 8, "int4": 4}

__all__ = ["BITS", "count_ops", "dequantized_weight", "quantize_weights"]
