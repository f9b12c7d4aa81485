"""One ONNX model at run time: its session, KV cache, decoder state, batching and CUDA graphs."""
