"""Tiny GGUF files written from the suite's random checkpoints, the way llama.cpp's converter writes them.

numpy, gguf and tokenizers only: tensors are named by gguf's TensorNameMap (the converter's), the
llama q/k rows are permuted for llama.cpp's rotary layout, Gemma's norms are stored as 1 + w, Llama 3
rope scaling becomes a `rope_freqs` tensor and phi3's longrope `rope_factors_long/short`, 1-D tensors
stay F32, 2-D ones are stored as F32, F16 or a block-quantized type, and the byte-level BPE tokenizer
goes into `tokenizer.ggml.*`.
K-quants (which gguf cannot quantize) are written as random raw blocks of the tensor's shape
(`random_blocks`), one type for every 2-D tensor or a llama.cpp-like mix (`MIXES`).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, RopeScalingType, TokenType, get_tensor_name_map
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from tokenizers import Tokenizer

from ortspec.export.builder.safetensors_io import SafetensorsCheckpoint
from ortspec.export.quantize import dequantized_weight
from ortspec.export.quantize.compact import folded_constants

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|endoftext|>' + message['role'] + '\n' + message['content'] + '<|pad|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant\n' }}{% endif %}"
)


def projection_weights(pipe: Any) -> dict[str, np.ndarray]:
    """Each projection's float weight [K, N] (dequantized for MatMulNBits), by the name of its output."""
    graph = onnx.load(pipe.manifest.root / pipe.manifest.target.onnx).graph
    inits = folded_constants(graph)  # scales and offsets as the session computes them at load
    weights = {
        node.output[0]: dequantized_weight(node, inits) if node.op_type == "MatMulNBits" else inits[node.input[1]]
        for node in graph.node
        if node.op_type in ("MatMul", "MatMulNBits")
    }
    for node in graph.node:  # Q4_1: MatMulNBits(x) + BlockMean(x) @ (block * C), C [K/block, N]
        if node.op_type == "Add" and node.input[0] in weights and node.input[1] in weights:
            w, c = weights.pop(node.input[0]), weights.pop(node.input[1])
            block = w.shape[0] // c.shape[0]
            weights[node.output[0]] = w + np.repeat(c / np.float32(block), block, axis=0)
    return weights


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: interleave the two rotary halves of each head's rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3 rope scaling."""
    scaling = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def q4_0_searched(w: np.ndarray, level: int = -7) -> np.ndarray:
    """Q4_0 bytes whose scale puts each block's largest weight at code `level` + 8.

    llama.cpp's reference quantizer uses level -8 (d = max / -8); its importance-matrix scale search
    often settles on another level, so the largest code of a block is not always -8.
    """
    blocks = w.astype(np.float32).reshape(-1, 32)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)
    d = (largest / level).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.nan_to_num(np.clip(np.rint(blocks / d.astype(np.float32)), -8, 7)).astype(np.int8) + 8
    q = q.astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)  # ggml's layout: element j in the low nibble, j + 16 in the high one
    return np.concatenate([d.view(np.uint8), packed], axis=1).reshape(*w.shape[:-1], w.shape[-1] // 32 * 18)


# where each type's fp16 scales (d, dmin / m) lie in its block, as byte offsets (negative: from the end)
FP16_FIELDS = {"Q4_0": [0], "Q8_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
               "Q6_K": [-2], "Q2_K": [-4, -2], "Q3_K": [-2]}  # fmt: skip


# a typical |code * sub-block scale| of each type, so that fp16 scales of `scale` / it give values near `scale`
TYPICAL_CODE = {"Q4_0": 4, "Q8_0": 64, "Q5_0": 8, "Q4_1": 8, "Q5_1": 16, "Q4_K": 256, "Q5_K": 512, "Q6_K": 1024,
                "Q2_K": 32, "Q3_K": 64}  # fmt: skip


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Raw `kind` blocks [rows, bytes per row] for a [rows, cols] tensor: random codes and sub-block scales,
    finite fp16 scales so that values lie near `scale`, signed as llama.cpp writes them (a symmetric type's d
    either way, a scale beside a minimum positive, Q4_1's minimum either way, K-quants' dmin positive)."""
    size, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
    fields = FP16_FIELDS[kind]
    for at in fields:
        signed = len(fields) == 1 or (kind in ("Q4_1", "Q5_1") and at == 2)
        at = at % nbytes
        sign = rng.choice([-1, 1], raw.shape[:2]) if signed else 1
        d = rng.uniform(scale, 2 * scale, raw.shape[:2]) / TYPICAL_CODE[kind] * sign
        raw[:, :, at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M, simplified: Q6_K for attn_v, ffn_down and the output, Q4_K for the rest."""
    return "Q6_K" if name == "output.weight" or any(part in name for part in ("attn_v.", "ffn_down.")) else "Q4_K"


MIXES: dict[str, Callable[[str], str]] = {
    "Q4_K": lambda name: "Q4_K",
    "Q5_K": lambda name: "Q5_K",
    "Q6_K": lambda name: "Q6_K",
    "Q3_K": lambda name: "Q3_K",
    "Q4_K_M": q4_k_m,
    "Q4_K_M+Q2_K": lambda name: "Q2_K" if name == "blk.1.attn_output.weight" else q4_k_m(name),
}


def _encode(w: np.ndarray, weights: str, name: str = "") -> tuple[np.ndarray, GGMLQuantizationType | None]:
    if w.ndim == 1 or weights == "F32":
        return w.astype(np.float32), None
    if weights in MIXES:
        kind = MIXES[weights](name)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return random_blocks(kind, *w.shape, rng, scale=float(np.abs(w).mean())), GGMLQuantizationType[kind]
    if weights == "F16":
        return w.astype(np.float16), None
    if weights == "Q4_0-searched":
        return q4_0_searched(w), GGMLQuantizationType.Q4_0
    qtype = GGMLQuantizationType[weights]
    return quantize(w.astype(np.float32), qtype), qtype


def add_bpe_tokenizer(writer: GGUFWriter, checkpoint_dir: Path) -> None:
    """The checkpoint's byte-level BPE tokenizer as llama.cpp stores a `gpt2` vocabulary."""
    data = json.loads((Path(checkpoint_dir) / "tokenizer.json").read_text())
    vocab = Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)


# config.json model_type -> the GGUF architecture llama.cpp's converter writes (Mistral is converted as llama)
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}


def add_hparams(writer: GGUFWriter, config: dict, arch: str, window_key: bool) -> None:
    """The metadata `set_gguf_parameters` writes: TextModel's common keys, then each model class's own."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    scaling = config.get("rope_scaling") or {}
    if arch == "phi3":  # Phi3MiniModel writes its own set, without key_length
        writer.add_rope_dimension_count(int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // heads)
        writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings") or 0)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if scaling.get("long_factor"):
            scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
            original = config["original_max_position_embeddings"]
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1
            )
        return
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if arch == "gemma3":
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_rope_freq_base_swa(config["rope_local_base_freq"])
    if window_key and config.get("sliding_window"):  # the converter writes no window for llama: tests only
        writer.add_sliding_window(config["sliding_window"])


def converted_tensors(checkpoint_dir: Path, config: dict, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) as `modify_tensors` yields them: named by gguf's own TensorNameMap (the
    converter's), llama's q/k rows permuted, Gemma's norms + 1, gemma3's lm_head dropped (it is tied)."""
    ckpt = SafetensorsCheckpoint(checkpoint_dir)
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tied = config.get("tie_word_embeddings") or arch == "gemma3"
    for hf in ckpt.names():
        if hf == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf
        w = ckpt.get(hf).astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = llama_cpp_permute(w, heads if ".attn_q." in name else kv_heads)
        if arch == "gemma3" and hf.endswith("norm.weight"):
            w = w + np.float32(1.0)
        yield name, w
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config)
    if arch == "phi3" and scaling.get("long_factor"):
        yield "rope_factors_long.weight", np.array(scaling["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.array(scaling["short_factor"], np.float32)


def write_gguf(
    checkpoint_dir: Path,
    path: Path,
    *,
    weights: str = "F32",
    architecture: str | None = None,
    tokenizer: bool = True,
    add_bos: bool | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    window_key: bool = False,
    drop: tuple[str, ...] = (),
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write the checkpoint at `checkpoint_dir` (llama, mistral, qwen2, qwen3, gemma3_text or phi3) as a GGUF
    file at `path`, as llama.cpp's converter would (its byte-level BPE tokenizer as a `gpt2` vocabulary).

    `weights`: F32, F16, a GGML type that gguf.quants can quantize (Q8_0, Q4_0, Q4_1, ...),
    Q4_0-searched (`q4_0_searched`) or a K-quant mix of `MIXES` (random blocks, not the checkpoint's values).
    `architecture` overrides general.architecture (to test refusals); `window_key` writes the sliding
    window of a llama-architecture file; `drop` leaves out the named tensors and metadata keys, `metadata`
    sets keys ("{arch}." for the architecture's prefix) to other values (to test refusals).
    """
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    family = config["model_type"]
    arch = GGUF_ARCHITECTURES[family]
    writer = GGUFWriter(str(path), architecture or arch)
    writer.add_name(f"tiny random {family}")
    add_hparams(writer, config, arch, window_key)
    if tokenizer:
        add_bpe_tokenizer(writer, checkpoint_dir)
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])
        writer.add_pad_token_id(config["pad_token_id"])
        writer.add_eot_token_id(1)  # a second end-of-generation id, as Llama 3 files have
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        if chat_template:
            writer.add_chat_template(chat_template)
    for name, w in converted_tensors(checkpoint_dir, config, arch):
        if name not in drop:
            data, qtype = _encode(w, weights, name)
            writer.add_tensor(name, data, raw_dtype=qtype)
    for key in [*drop, *(metadata or {})]:
        writer.kv_data[0].pop(key.replace("{arch}", writer.arch), None)
    for key, value in (metadata or {}).items():
        add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}
        add.get(type(value), writer.add_array)(key.replace("{arch}", writer.arch), value)  # type: ignore[operator]
    return finish(writer, path)


def finish(writer: GGUFWriter, path: Path) -> Path:
    """Write the header, metadata and tensors a GGUFWriter holds to `path`."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
