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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortspec.runtime.package import graph_names as names
from ortspec.runtime.package.json_file import read_json
from ortspec.runtime.package.manifest import HEAD_KIND
from ortspec.runtime.package.schema import OBJECT, POSITIVE, STRING, integer, list_of, one_of, optional, problem, record

from .config import DecoderConfig
from .graph import GraphBuilder, decoder_stack, finish_graph, last_positions, logits_to_keep_input, rotary_tables
from .safetensors_io import SafetensorsCheckpoint, SafetensorsFile
from .weights import WeightReader

HEAD_CONFIG = "head.json"
LM_DRAFT_CONFIG = "ortspec-draft.json"  # what `distill --kind lm` writes beside its Hugging Face checkpoint
HEAD_WEIGHTS = "head.safetensors"
FINAL_NORM = "model.norm.weight"
HEAD_FORMAT = 2  # 2: `feature_layers`, the inner layers its features hold besides the final ones
HEAD_SCHEMA = record(  # what head.json must hold (format 1 heads lack `format` and `feature_layers`)
    {
        "kind": one_of(HEAD_KIND),
        "format": optional(integer(1)),
        "target_fingerprint": STRING,
        "feature_layers": optional(list_of(integer(1))),
        "hidden_size": optional(POSITIVE),
        "vocab_size": optional(POSITIVE),
        "training": optional(OBJECT),
    }
)


def is_head_dir(path: str | Path) -> bool:
    """Whether `path` holds draft-head weights (as `ortspec distill` writes them)."""
    return (Path(path) / HEAD_CONFIG).is_file()


def read_head_config(path: str | Path) -> dict[str, Any]:
    """head.json, every field checked as a manifest's are: errors name the file and the field."""
    file = Path(path) / HEAD_CONFIG
    config = read_json(file)
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind != HEAD_KIND:
        raise ValueError(f"{file} is not an ortspec draft head (kind {kind!r})")
    version = config.get("format", 1)
    if type(version) is int and version > HEAD_FORMAT:
        raise ValueError(f"{path} holds a draft head of format {version}: made by a newer ortspec, upgrade it")
    if found := problem(config, HEAD_SCHEMA, document=str(file)):
        raise ValueError(found)
    if version >= 2 and "feature_layers" not in config:
        raise ValueError(f"{file} field feature_layers is missing (a format 2 head lists the layers it reads)")
    return config


def check_head(path: str | Path) -> dict[str, Any]:
    """head.json and head.safetensors checked against each other, before anything is built: the tensors a
    head has, shaped for its own width and the features it reads. Returns head.json."""
    config = read_head_config(path)
    file = Path(path) / HEAD_WEIGHTS
    if not file.is_file():
        raise ValueError(f"{path} has no {HEAD_WEIGHTS} (a draft head's weights, as `ortspec distill` writes them)")
    weights = SafetensorsFile(file)
    norm = weights.shape(FINAL_NORM) if FINAL_NORM in weights.names() else None
    if norm is None or len(norm) != 1:
        raise ValueError(f"{file} has no 1-D tensor {FINAL_NORM}: not the weights of a draft head")
    hidden = norm[0]
    parts = 1 + len(config.get("feature_layers", []))
    expected = {"fc.weight": [hidden, hidden * (1 + parts)], "vocab_subset": None}
    for name, shape in expected.items():
        if name not in weights.names():
            raise ValueError(f"{file} has no tensor {name}: not the weights of a draft head")
        found = weights.shape(name)
        if (shape is not None and found != shape) or (shape is None and len(found) != 1):
            want = f"{shape}" if shape else "1-D"
            raise ValueError(
                f"{file}: tensor {name} is {found}, not {want} ({hidden} wide, reading {parts} feature vector(s) "
                f"as {HEAD_CONFIG}'s feature_layers say)"
            )
    if config.get("hidden_size", hidden) != hidden:
        raise ValueError(f"{file} holds a head {hidden} wide, {HEAD_CONFIG} says hidden_size {config['hidden_size']}")
    return config


def check_head_layer(weights: SafetensorsCheckpoint, cfg: DecoderConfig, where: Path) -> None:
    """The head's layer tensors are there and shaped for a layer of `cfg` (the target's width)."""
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {
        "input_layernorm.weight": [cfg.hidden],
        "self_attn.q_proj.weight": [q, cfg.hidden],
        "self_attn.k_proj.weight": [kv, cfg.hidden],
        "self_attn.v_proj.weight": [kv, cfg.hidden],
        "self_attn.o_proj.weight": [cfg.hidden, q],
        "post_attention_layernorm.weight": [cfg.hidden],
        "mlp.gate_proj.weight": [cfg.intermediate, cfg.hidden],
        "mlp.up_proj.weight": [cfg.intermediate, cfg.hidden],
        "mlp.down_proj.weight": [cfg.hidden, cfg.intermediate],
        FINAL_NORM: [cfg.hidden],
    }
    for part, shape in shapes.items():
        name = part if part == FINAL_NORM else f"model.layers.0.{part}"
        found = weights.shape(name) if name in weights else None
        if found != shape:
            what = "missing" if found is None else f"{found}"
            raise ValueError(f"{where}: tensor {name} is {what}, not {shape} (a layer of the target's shape)")


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
    check_head_layer(weights, cfg, head_dir / HEAD_WEIGHTS)
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
    "check_head",
    "head_decoder_config",
    "is_head_dir",
    "read_head_config",
    "target_fingerprint",
]
