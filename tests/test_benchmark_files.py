"""The files the export-at-scale and GGUF-quality benchmarks make: a Q4_0 GGUF of a shape written directly
with another file's tokenizer (benchmarks/scale.py) and an HF checkpoint of a GGUF's weights
(benchmarks/gguf_quality.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from tokenizers import Tokenizer

from ortspec.export.builder.gguf_io import GGUFCheckpoint, open_gguf
from ortspec.export.builder.safetensors_io import SafetensorsCheckpoint

from helpers.gguf_files import write_gguf

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=400, tied=False)


def test_q4_0_gguf_of_a_shape_is_that_shape(checkpoint, tmp_path):
    """Every matrix is Q4_0 of its shape with finite values; the tokenizer is the source's, padded to the
    vocabulary with unused tokens; ortspec reads it back as the same Llama config."""
    from scale import tensor_shapes, write_gguf_checkpoint

    source = write_gguf(checkpoint("llama"), tmp_path / "source.gguf")
    path = write_gguf_checkpoint(tmp_path / "shape.gguf", SHAPE, "Q4_0", tokenizer=source)
    model = open_gguf(path)
    config = model.config()
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 96)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 400)
    assert config["tie_word_embeddings"] is False
    weights = GGUFCheckpoint(model)
    assert set(weights.names()) == set(tensor_shapes(SHAPE))
    for name, dims in tensor_shapes(SHAPE).items():
        assert weights.shape(name) == list(dims), name
        w = weights.get(name)
        if len(dims) == 1:
            assert np.all(w == 1.0)
        else:
            assert weights.dtype(name) == GGMLQuantizationType.Q4_0.name
            assert np.isfinite(w).all() and np.abs(w).max() > 0
    tokens = list(model.metadata["tokenizer.ggml.tokens"])
    source_tokens = list(open_gguf(source).metadata["tokenizer.ggml.tokens"])
    assert tokens[: len(source_tokens)] == source_tokens and tokens[-1] == "[PAD399]" and len(tokens) == 400


def test_hf_checkpoint_of_a_gguf_holds_its_weights(checkpoint, tmp_path):
    """An F32 GGUF (q/k rows permuted as llama.cpp stores them) becomes the checkpoint it was written from:
    the same tensors, config shape and tokenization (the BOS the file adds aside)."""
    from gguf_quality import hf_checkpoint

    original = checkpoint("llama")
    out = hf_checkpoint(write_gguf(original, tmp_path / "f32.gguf"), tmp_path / "hf")
    made, source = SafetensorsCheckpoint(out), SafetensorsCheckpoint(original)
    assert set(made.names()) == set(source.names())
    for name in source.names():
        np.testing.assert_array_equal(made.get(name), source.get(name).astype(np.float32), err_msg=name)
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (out, original))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == source_config[key], key
    text = "def f(x):\n    return x * 2  # Ünïcödé"
    encode = [
        Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        for d in (out, original)
    ]
    assert encode[0] == encode[1]


def test_timed_reports_peak_rss_and_cpu_time_and_failures(tmp_path):
    from llama_peer import timed

    run = timed([sys.executable, "-c", "x = bytearray(200_000_000); print(len(x))"])
    assert run.stdout.strip() == "200000000" and run.rss_gb > 0.2 and run.cpu_s >= 0 and run.seconds > 0
    with pytest.raises(RuntimeError, match="failed"):
        timed([sys.executable, "-c", "raise SystemExit(3)"])
