"""A feature-level draft head (EAGLE-style) as an ONNX graph, built from its weights and the target's.

The head is one decoder layer that reads, at position j, the target's final features f_j and the
embedding of token x_{j+1}, and predicts f_{j+1}; the target's own lm_head turns that into a guess
of x_{j+2}. Drafting feeds its predictions back in. Its token scores are restricted to a subset of
the vocabulary (the tokens the target says most), which makes a step cost a few percent of a
target step; restricting proposals is lossless, the target still verifies every token. The graph
scatters those scores into a full-vocabulary row (-inf elsewhere), so the runtime treats the head's
logits like any draft model's.

Head weights live in a directory: `head.json` (shape, the target it was trained for, how) and
`head.safetensors` (`fc.weight` [hidden, (1 + parts) * hidden] over [embedding; features], one Llama
layer as `model.layers.0.*`, `model.norm.weight`, and `vocab_subset`, the token ids it may propose).
Format 2 heads may read fused features (`feature_layers` in head.json): the target's final features,
then its inner layers' RMS-normalised outputs, as the target graph built for them emits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortspec.runtime.package import graph_names as names
from ortspec.runtime.package.manifest import HEAD_KIND

from .config import DecoderConfig
from .graph import GraphBuilder, decoder_stack, finish_graph, last_positions, logits_to_keep_input, rotary_tables
from .safetensors_io import SafetensorsCheckpoint
from .weights import WeightReader

HEAD_CONFIG = "head.json"
LM_DRAFT_CONFIG = "ortspec-draft.json"  # what `distill --kind lm` writes beside its Hugging Face checkpoint
HEAD_WEIGHTS = "head.safetensors"
HEAD_FORMAT = 2  # 2: `feature_layers`, the inner layers its features hold besides the final ones


def is_head_dir(path: str | Path) -> bool:
    """Whether `path` holds draft-head weights (as `ortspec distill` writes them)."""
    return (Path(path) / HEAD_CONFIG).is_file()


def read_head_config(path: str | Path) -> dict[str, Any]:
    config = json.loads((Path(path) / HEAD_CONFIG).read_text(encoding="utf-8"))
    if config.get("kind") != HEAD_KIND:
        raise ValueError(f"{path}/{HEAD_CONFIG} is not an ortspec draft head (kind {config.get('kind')!r})")
    if config.get("format", 1) > HEAD_FORMAT:
        raise ValueError(f"{path} holds a draft head of format {config['format']}: made by a newer ortspec, upgrade it")
    return config


def head_decoder_config(target: DecoderConfig) -> DecoderConfig:
    """The head's layer: a plain Llama layer of the target's width, whatever the target's family
    (with the target's rope, but not longrope's switch: a draft need not be exact, and a head's
    cache is not recomputed)."""
    return DecoderConfig(
        family="llama",
        vocab_size=target.vocab_size,
        hidden=target.hidden,
        layers=1,
        heads=target.heads,
        kv_heads=target.kv_heads,
        head_dim=target.head_dim,
        intermediate=target.intermediate,
        rms_eps=target.rms_eps,
        rope_theta=target.rope_theta,
        rope_scaling=None if target.long_rope_after else target.rope_scaling,
        max_positions=target.max_positions,
        tie_embeddings=False,
    )


def target_fingerprint(target: WeightReader) -> str:
    """A short hash of the target's final norm and a few embedding rows: a head only fits its own target."""
    embedding = target.embedding()
    rows = embedding[:: max(1, len(embedding) // 64)][:64]
    digest = hashlib.sha256(np.ascontiguousarray(target.final_norm(), np.float32).tobytes())
    digest.update(np.ascontiguousarray(rows, np.float32).round(4).tobytes())
    return digest.hexdigest()[:16]


def _scatter_to_vocab(g: GraphBuilder, scores: str, subset: np.ndarray, vocab: int) -> str:
    """[1, S, K] scores of the subset -> [1, S, vocab] logits, -inf for tokens outside it."""
    rows = g.one("Shape", [scores], end=2)
    full_shape = g.one("Concat", [rows, g.constant("vocab_dim", np.array([vocab], np.int64))], axis=0)
    base = g.one("Expand", [g.constant("minus_inf", np.array([-np.inf], np.float32)), full_shape])
    index = g.one("Expand", [g.constant("vocab_subset", subset.reshape(1, 1, -1)), g.one("Shape", [scores])])
    return g.one("ScatterElements", [base, index, scores], axis=2)


def build_head(head_dir: Path, target: WeightReader, max_positions: int) -> onnx.ModelProto:
    """The head's graph: inputs input_ids and features [1, S, parts x hidden] (+ the usual cache inputs);
    outputs full-vocabulary logits and its predicted final features (`hidden_states`)."""
    cfg = head_decoder_config(target.cfg)
    weights = SafetensorsCheckpoint(head_dir)
    reader = WeightReader(weights, cfg)
    subset = weights.get("vocab_subset").astype(np.int64)
    if subset.min() < 0 or subset.max() >= cfg.vocab_size:
        raise ValueError(f"the head's vocab_subset holds ids outside the target's vocabulary of {cfg.vocab_size}")
    g = GraphBuilder()
    rotary_tables(g, cfg, max_positions, reader.padded)
    table = g.constant("embed_tokens.weight", target.embedding().astype(np.float16))
    embedded = g.one("Cast", [g.one("Gather", [table, names.INPUT_IDS])], to=TensorProto.FLOAT)
    joined = g.one("Concat", [embedded, names.FEATURES], axis=-1)
    fc = reader.linear("fc.weight")  # [embedding + features, hidden]
    x = g.one("MatMul", [joined, g.constant("fc.weight", fc)])
    h, _ = decoder_stack(g, cfg, [reader.layer(0)], x, reader.final_norm(), reader.padded)
    lm_head = np.ascontiguousarray(target.lm_head()[:, subset])
    scores = g.one("MatMul", [last_positions(g, h), g.constant("lm_head.weight", lm_head)])  # a catch-up scores one
    logits = _scatter_to_vocab(g, scores, subset, cfg.vocab_size)
    width = fc.shape[0] - cfg.hidden
    features = helper.make_tensor_value_info(names.FEATURES, TensorProto.FLOAT, [1, "sequence_length", width])
    extra = [features, logits_to_keep_input()]
    return finish_graph(g, cfg, "ortspec-eagle-head", logits, h, cfg.vocab_size, reader.padded, extra, "scored")


__all__ = [
    "HEAD_FORMAT",
    "HEAD_KIND",
    "build_head",
    "head_decoder_config",
    "is_head_dir",
    "read_head_config",
    "target_fingerprint",
]
