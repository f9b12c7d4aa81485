"""Assemble the decoder graph: GroupQueryAttention over a shared KV buffer, fused norms, fp32 weights.

Inputs: input_ids [B, S], seqlens_k [B] (each row's total length - 1), total_sequence_length (scalar)
and per layer past_key_values.{i}.key/value [B, kv_heads, max_length, head_dim]. Outputs: logits
[B, S, vocab], present.{i}.key/value, and hidden_states [B, S, hidden x (1 + len(feature_layers))]: the
final-normed features the lm_head reads, then the RMS-normalised residual stream after each of
`feature_layers` layers (a feature-level draft head continues from them; EAGLE-3 fuses a low, a middle
and a high layer the same way). Free to compute, bound only when wanted. The
runtime binds each past and present to the same preallocated buffer, so GroupQueryAttention writes
the new entries in place and rolling back costs nothing. The batch B is a dynamic dimension: a
server steps several sequences in one call (runtime/batching.py; GroupQueryAttention on CPU takes
B > 1 only for one new token per row, or for prompts without a past).

The cache is fp32, or fp16 (`GraphBuilder(kv_dtype="float16")`: half the bytes). ONNX Runtime's CPU
GroupQueryAttention takes q and the cache in one type (an fp32 q over an fp16 cache converts the whole
buffer every call), so an fp16 cache casts q/k/v to fp16 before attention and its output back to fp32;
the rotary tables are then fp16 too. See docs/design.md, "The KV cache's precision".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortspec.runtime.package import graph_names as names

from ..quantize.nodes import MS_DOMAIN
from .config import DecoderConfig
from .rope import attention_factor, cos_sin_caches, inverse_frequencies
from .weights import LayerWeights, WeightReader

if TYPE_CHECKING:
    from ..quantize.gguf_raw import GGUFWeight
    from ..quantize.streaming import QuantizedWeight, StreamingQuantizer
    from .external import ExternalData

OPSET = 21
BATCH = "batch_size"  # the dynamic batch dimension of inputs, cache and outputs
KV_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}  # the cache's precisions


class GraphBuilder:
    """Collects nodes and initializers with unique names.

    With `data`, large initializers go straight to the external data file; with `quantizer`, MatMul weights
    become quantized blocks as they arrive (`matmul`), so no fp32 weight outlives its layer. `kv_dtype`
    ("float32" or "float16") is the KV cache's precision, and attention's."""

    def __init__(
        self,
        data: ExternalData | None = None,
        quantizer: StreamingQuantizer | None = None,
        kv_dtype: str = "float32",
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"the KV cache's dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.data, self.quantizer = data, quantizer
        self.kv_type = KV_DTYPES[kv_dtype]
        self._count = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.initializers.append(self.data.tensor(name, array) if self.data else numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        self._count += 1
        name = f"{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def matmul(self, x: str, name: str, weight: np.ndarray | GGUFWeight) -> str:
        """x @ weight [in, out]: a MatMul over an fp32 constant, or the quantizer's nodes over its blocks; the
        output is `{name}_out` either way."""
        if self.quantizer is not None:
            return self.quantizer.matmul(self, x, name, weight)
        assert isinstance(weight, np.ndarray)  # GGUF blocks are read for a quantizer only
        self.nodes.append(helper.make_node("MatMul", [x, self.constant(name, weight)], [f"{name}_out"], name=name))
        return f"{name}_out"


def _attention(g: GraphBuilder, cfg: DecoderConfig, i: int, w: LayerWeights, h: str, head_dim: int) -> str:
    qkv = g.matmul(h, f"layers.{i}.attn.qkv.weight", w.qkv)
    if w.qkv_bias is not None:
        qkv = g.one("Add", [qkv, g.constant(f"layers.{i}.attn.qkv.bias", w.qkv_bias)])
    if cfg.qk_norm:
        sizes = g.constant(
            f"layers.{i}.attn.split", np.array([cfg.heads, cfg.kv_heads, cfg.kv_heads], np.int64) * head_dim
        )
        q, k, v = g.op("Split", [qkv, sizes], 3, axis=-1)
        if w.q_norm is None or w.k_norm is None:
            raise ValueError(f"layer {i} has no q/k norm weights, but the config asks for q/k norms")
        q = _head_norm(g, q, w.q_norm, f"layers.{i}.attn.q_norm.weight", cfg, cfg.heads, head_dim)
        k = _head_norm(g, k, w.k_norm, f"layers.{i}.attn.k_norm.weight", cfg, cfg.kv_heads, head_dim)
        query = [q, k, v]
    else:
        query = [qkv, "", ""]
    if g.kv_type != TensorProto.FLOAT:  # attention runs in the cache's type
        query = [g.one("Cast", [x], to=g.kv_type) if x else x for x in query]
    cos, sin = rotary_names(cfg, i)
    attrs = dict(num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, scale=cfg.scale, do_rotary=1, rotary_interleaved=0)
    if cfg.attn_softcap:
        attrs["softcap"] = cfg.attn_softcap
    if cfg.sliding_window and cfg.sliding_layers and cfg.sliding_layers[i]:
        attrs["local_window_size"] = cfg.sliding_window
    out = g.op(
        "GroupQueryAttention",
        [
            *query,
            names.past_name(i, "key"),
            names.past_name(i, "value"),
            names.SEQLENS_K,
            names.TOTAL_SEQUENCE_LENGTH,
            cos,
            sin,
        ],
        [f"layers.{i}.attn.output", names.present_name(i, "key"), names.present_name(i, "value")],
        domain=MS_DOMAIN,
        **attrs,
    )[0]
    if g.kv_type != TensorProto.FLOAT:
        out = g.one("Cast", [out], to=TensorProto.FLOAT)
    return g.matmul(out, f"layers.{i}.attn.o_proj.weight", w.o_proj)


def _head_norm(
    g: GraphBuilder, x: str, weight: np.ndarray, name: str, cfg: DecoderConfig, heads: int, head_dim: int
) -> str:
    """RMSNorm over each head (q/k norms): [1, S, heads*d] -> [1, S, heads, d] -> norm -> back.

    A zero-padded head has the same sum of squares over more dims: eps and the weight are rescaled
    so the mean is still over the real dims."""
    ratio = cfg.head_dim / head_dim
    per_head = g.one("Reshape", [x, g.constant(f"{x}.shape", np.array([0, 0, heads, head_dim], np.int64))])
    scale = g.constant(name, (weight * np.float32(ratio**0.5)).astype(np.float32))
    normed = g.op("SimplifiedLayerNormalization", [per_head, scale], 1, axis=-1, epsilon=cfg.rms_eps * ratio)[0]
    return g.one("Reshape", [normed, g.constant(f"{x}.back", np.array([0, 0, heads * head_dim], np.int64))])


def _mlp(g: GraphBuilder, cfg: DecoderConfig, i: int, w: LayerWeights, h: str) -> str:
    gate_up = g.matmul(h, f"layers.{i}.mlp.gate_up.weight", w.gate_up)
    gate, up = g.op(
        "Split", [gate_up, g.constant(f"layers.{i}.mlp.split", np.array([cfg.intermediate] * 2, np.int64))], 2, axis=-1
    )
    if cfg.activation == "silu":
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
    else:
        act = g.one("Gelu", [gate], approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
    return g.matmul(g.one("Mul", [act, up]), f"layers.{i}.mlp.down.weight", w.down)


def _norm(g: GraphBuilder, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    return _norm_op(g, x, g.constant(name, weight), eps)


def _norm_op(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    return g.op("SimplifiedLayerNormalization", [x, weight], 1, axis=-1, epsilon=eps)[0]


def _skip_norm(g: GraphBuilder, x: str, residual: str, weight: np.ndarray, name: str, eps: float) -> tuple[str, str]:
    """(norm(residual + x), residual + x) in one fused op."""
    out = g.op(
        "SkipSimplifiedLayerNormalization", [x, residual, g.constant(name, weight)], 4, domain=MS_DOMAIN, epsilon=eps
    )
    return out[0], out[3]


def rotary_names(cfg: DecoderConfig, i: int) -> tuple[str, str]:
    """The cos/sin caches layer `i` rotates with: gemma3's sliding layers have their own."""
    if cfg.local_rope_theta is not None and cfg.sliding_layers[i]:
        return "cos_cache_local", "sin_cache_local"
    return "cos_cache", "sin_cache"


def rotary_tables(g: GraphBuilder, cfg: DecoderConfig, max_positions: int, head_dim: int) -> None:
    """The cos/sin caches GroupQueryAttention rotates q and k with (see `rotary_names`).

    Longrope has a short and a long table; the graph takes the long one's rows once the sequence
    (total_sequence_length) is longer than the switch point, as transformers' Phi-3 does. The tables are
    in attention's type (`g.kv_type`).
    """
    half, dim, scaling = head_dim // 2, cfg.rotary, cfg.rope_scaling
    dtype = helper.tensor_dtype_to_np_dtype(g.kv_type)
    if cfg.local_rope_theta is not None:
        local = cos_sin_caches(inverse_frequencies(dim, cfg.local_rope_theta, None), max_positions, half, 1, dtype)
        g.constant("cos_cache_local", local[0])
        g.constant("sin_cache_local", local[1])
    scale = attention_factor(scaling)
    short = cos_sin_caches(inverse_frequencies(dim, cfg.rope_theta, scaling), max_positions, half, scale, dtype)
    if cfg.long_rope_after is None:
        g.constant("cos_cache", short[0])
        g.constant("sin_cache", short[1])
        return
    long_freq = inverse_frequencies(dim, cfg.rope_theta, scaling, long=True)
    long = cos_sin_caches(long_freq, max_positions, half, scale, dtype)
    total = g.one("Cast", [names.TOTAL_SEQUENCE_LENGTH], to=TensorProto.INT64)
    is_long = g.one("Greater", [total, g.constant("long_rope_after", np.array(cfg.long_rope_after, np.int64))])
    offset = g.one(
        "Mul",
        [g.one("Cast", [is_long], to=TensorProto.INT64), g.constant("rope_rows", np.array(max_positions, np.int64))],
    )
    one = g.constant("rope_one", np.array([1], np.int64))  # total_sequence_length may come as [] or [1]
    start = g.one("Reshape", [offset, one])
    end = g.one("Add", [start, g.one("Reshape", [total, one])])
    axes = g.constant("rope_axes", np.array([0], np.int64))
    for kind, index in (("cos", 0), ("sin", 1)):
        table = g.constant(f"{kind}_tables", np.concatenate([short[index], long[index]]))  # short rows, then long
        g.op("Slice", [table, start, end, axes], [f"{kind}_cache"])


def decoder_stack(
    g: GraphBuilder,
    cfg: DecoderConfig,
    layers: Sequence[LayerWeights],
    residual: str,
    final_norm: np.ndarray,
    head_dim: int,
    taps: Sequence[int] = (),
) -> tuple[str, list[str]]:
    """Pre-norm decoder layers on the residual stream `residual`; returns the final-normed features and
    the residual stream after each of `taps` layers (1 .. len(layers) - 1)."""
    h = _norm(g, residual, layers[0].attn_norm, "layers.0.attn_norm.weight", cfg.rms_eps)
    tapped = {}
    for i, w in enumerate(layers):
        attn = _attention(g, cfg, i, w, h, head_dim)
        if w.post_attn_norm is not None:
            attn = _norm(g, attn, w.post_attn_norm, f"layers.{i}.post_attn_norm.weight", cfg.rms_eps)
        h, residual = _skip_norm(g, attn, residual, w.mlp_norm, f"layers.{i}.mlp_norm.weight", cfg.rms_eps)
        mlp = _mlp(g, cfg, i, w, h)
        if w.post_mlp_norm is not None:
            mlp = _norm(g, mlp, w.post_mlp_norm, f"layers.{i}.post_mlp_norm.weight", cfg.rms_eps)
        last = i == len(layers) - 1
        h, residual = _skip_norm(
            g,
            mlp,
            residual,
            final_norm if last else layers[i + 1].attn_norm,
            "final_norm.weight" if last else f"layers.{i + 1}.attn_norm.weight",
            cfg.rms_eps,
        )
        if i + 1 in taps:
            tapped[i + 1] = residual
    return h, [tapped[k] for k in taps]


def check_feature_layers(feature_layers: Sequence[int], layers: int) -> None:
    if any(not 0 < k < layers for k in feature_layers) or len(set(feature_layers)) != len(feature_layers):
        raise ValueError(
            f"feature layers must be distinct inner layers, 1 .. {layers - 1} of {layers}: got {list(feature_layers)}"
        )


def fused_features(g: GraphBuilder, cfg: DecoderConfig, final: str, inner: list[str]) -> str:
    """[final features; RMSNorm(each inner residual)], unweighted: a head scales each part itself."""
    if not inner:
        return final
    ones = g.constant("feature_norm.weight", np.ones(cfg.hidden, np.float32))
    normed = [_norm_op(g, x, ones, cfg.rms_eps) for x in inner]
    return g.one("Concat", [final, *normed], axis=-1)


def build_decoder(
    reader: WeightReader, max_positions: int, feature_layers: Sequence[int] = (), g: GraphBuilder | None = None
) -> onnx.ModelProto:
    """The whole decoder graph for the checkpoint behind `reader`, rotary tables for `max_positions`;
    its hidden_states also carry the residual stream after each of `feature_layers` layers. `g` may write
    weights to external data and quantize them as they come; layers are read one at a time either way."""
    cfg, head_dim = reader.cfg, reader.padded
    g = g or GraphBuilder()
    reader.gguf_blocks = g.quantizer is not None  # a GGUF's weights reach the quantizer as the file's blocks
    rotary_tables(g, cfg, max_positions, head_dim)
    hidden, lm_head = _embedding(g, reader)
    if cfg.embed_scale != 1.0:
        hidden = g.one("Mul", [hidden, g.constant("embed_scale", np.array(cfg.embed_scale, np.float32))])
    residual = hidden
    check_feature_layers(feature_layers, cfg.layers)
    layers = LazyLayers(reader)
    h, inner = decoder_stack(g, cfg, layers, residual, reader.final_norm(), head_dim, feature_layers)
    last = last_positions(g, h)
    if lm_head is not None and g.quantizer is not None:  # the lookup's blocks, shared
        logits = g.quantizer.apply(g, last, lm_head)
    elif g.quantizer is not None:
        logits = g.quantizer.matmul(g, last, "lm_head.weight", reader.lm_head_columns())
    else:
        logits = g.matmul(last, "lm_head.weight", reader.lm_head())
    if cfg.final_softcap:
        cap = g.constant("final_softcap", np.array(cfg.final_softcap, np.float32))
        logits = g.one("Mul", [g.one("Tanh", [g.one("Div", [logits, cap])]), cap])
    keep = logits_to_keep_input()
    features = fused_features(g, cfg, h, inner)
    name = f"ortspec-{cfg.family}"
    return finish_graph(g, cfg, name, logits, features, cfg.vocab_size, head_dim, (keep,), "scored", len(inner) + 1)


def _embedding(g: GraphBuilder, reader: WeightReader) -> tuple[str, QuantizedWeight | None]:
    """The token lookup, and the quantized lm_head it shares its blocks with (tied embeddings, quantizing).

    Quantizing, the table is stored as blocks too (GatherBlockQuantized): a tied one once, for both uses
    (unless the lm_head runs on the int8 GEMM, which has a copy of its own); an untied one on its own, so a
    package is about the size of its quantized source."""
    tied = reader.tied
    if g.quantizer is not None and (tied or g.quantizer.untied_embedding):
        shared = tied and not g.quantizer.on_gemm("lm_head.weight")
        q = g.quantizer.store(g, "lm_head.weight" if shared else "embed_tokens", reader.embedding_columns())
        rows = g.quantizer.gather(g, q, names.INPUT_IDS, shared=shared)
        if rows is not None:
            return rows, q if shared else None
    table = reader.embedding()
    return g.one("Gather", [g.constant("embed_tokens.weight", table), names.INPUT_IDS]), None


class LazyLayers(Sequence[LayerWeights]):
    """The layers of a checkpoint read on demand, the last one kept: a pass over them holds two at most."""

    def __init__(self, reader: WeightReader) -> None:
        self.reader = reader
        self._last: tuple[int, LayerWeights] | None = None

    def __len__(self) -> int:
        return self.reader.cfg.layers

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]  # slices are not needed
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._last is None or self._last[0] != i:
            self._last = (i, self.reader.layer(i))
        return self._last[1]


def last_positions(g: GraphBuilder, h: str) -> str:
    """The last `logits_to_keep` positions of `h` (0: all), the only ones the lm_head scores. A prompt (or a
    draft's catch-up) needs the logits of its last position alone, and the lm_head is a fifth of a small
    model's weights: scoring every position would cost that fifth again per position, and write positions
    x vocabulary floats."""
    start = g.one("Neg", [names.LOGITS_TO_KEEP])
    end = g.constant("logits_end", np.array([np.iinfo(np.int64).max], np.int64))
    return g.one("Slice", [h, start, end, g.constant("logits_axis", np.array([1], np.int64))])


def logits_to_keep_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(names.LOGITS_TO_KEEP, TensorProto.INT64, [1])


def finish_graph(
    g: GraphBuilder,
    cfg: DecoderConfig,
    name: str,
    logits: str,
    hidden: str,
    vocab: int,
    head_dim: int,
    extra=(),
    logits_length: str = "sequence_length",
    hidden_parts: int = 1,
) -> onnx.ModelProto:
    """Name the outputs (logits, presents, hidden_states) and declare the inputs of a shared-buffer graph.

    `extra` holds additional graph inputs (value infos), e.g. a draft head's features; `logits_length`
    names the logits' positions dimension (other than the sequence's when only some are scored);
    `hidden` is `hidden_parts` feature vectors of the model's width side by side.
    """
    g.nodes.append(helper.make_node("Identity", [logits], [names.LOGITS], name="logits_identity"))
    g.nodes.append(helper.make_node("Identity", [hidden], [names.HIDDEN_STATES], name="hidden_identity"))
    cache_shape: list[str | int] = [BATCH, cfg.kv_heads, "max_length", head_dim]
    inputs = [
        helper.make_tensor_value_info(names.INPUT_IDS, TensorProto.INT64, [BATCH, "sequence_length"]),
        *extra,
        helper.make_tensor_value_info(names.SEQLENS_K, TensorProto.INT32, [BATCH]),
        helper.make_tensor_value_info(names.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info(names.LOGITS, TensorProto.FLOAT, [BATCH, logits_length, vocab])]
    for past, present in zip(names.past_names(cfg.layers), names.present_names(cfg.layers), strict=True):
        inputs.append(helper.make_tensor_value_info(past, g.kv_type, cache_shape))
        outputs.append(helper.make_tensor_value_info(present, g.kv_type, cache_shape))
    hidden_shape: list[str | int] = [BATCH, "sequence_length", cfg.hidden * hidden_parts]
    outputs.append(helper.make_tensor_value_info(names.HIDDEN_STATES, TensorProto.FLOAT, hidden_shape))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="ortspec",
    )
    model.ir_version = 10
    return model
