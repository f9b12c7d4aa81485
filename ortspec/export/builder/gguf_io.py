"""Read GGUF files (llama.cpp's format) with numpy and the `gguf` package's tensor types alone.

A GGUF file holds the config (metadata keys such as `llama.block_count`), the tokenizer
(`tokenizer.ggml.*`) and the weights, many of them block-quantized (Q4_0, Q4_1, Q8_0, K-quants...).
`GGUFModel.config()` turns the metadata into the Hugging Face-style config dict that
`builder.config.decoder_config` reads, and `GGUFCheckpoint` serves the weights under Hugging Face
tensor names, dequantized to float32, so `WeightReader` builds the same graph as from safetensors.

llama.cpp's converter permutes the rows of the q/k projections of Llama-architecture models for its
interleaved rotary layout; `GGUFCheckpoint` undoes that permutation (Qwen2 is stored unpermuted).

The header is parsed with bounds (`gguf_file`); `GGUFModel.config()` then checks every value the
builder uses (counts, sizes, every tensor's presence and shape) and refuses a bad one in one line
naming the key or tensor, so no file reaches the builder to fail there with a traceback, and none
makes a package the loader would refuse.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..quantize.gguf_raw import LAYOUTS, Blocks, read_blocks, take
from .config import UnsupportedModelError
from .gguf_file import GGUFError, GGUFFile, TensorInfo

ARCHITECTURES = ("llama", "qwen2")  # GGUF `general.architecture` values the builder reproduces exactly

# GGUF tensor names -> Hugging Face names (per layer: blk.N.X -> model.layers.N.Y); only what the builder reads
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


MAX_LAYERS = 1024
MAX_WIDTH = 1 << 20  # hidden, feed-forward and head sizes, heads
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24
MAX_NAME_CHARS = 1024  # general.name goes into the manifest, which the loader reads only up to 16 MB
MAX_CHAT_TEMPLATE_CHARS = 1 << 20


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


class GGUFModel:
    """One GGUF file: metadata as a dict, tensors by GGUF name (memory-mapped, read on demand)."""

    def __init__(self, path: Path) -> None:
        try:
            import gguf  # noqa: F401  (tensor types and dequantization)
        except ImportError as exc:  # a base dependency, but say so plainly if it is missing
            raise GGUFError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from exc
        self.path = Path(path)
        try:
            self.file = GGUFFile(self.path)
        except OSError as exc:
            raise GGUFError(f"{self.path} is not a readable file: {exc}") from exc
        self.metadata: dict[str, Any] = self.file.metadata
        self.tensors: dict[str, TensorInfo] = self.file.tensors
        if self._int("split.count", 1, whole=True) > 1:
            raise GGUFError(
                f"{self.path.name} is one part of a split GGUF ({self.metadata['split.count']} files); "
                "merge the parts first (llama-gguf-split --merge)"
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy (row-major) order."""
        return self.tensors[name].shape

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type (F32, Q4_1, ...) the file holds."""
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _int(self, key: str, default: int | None = None, *, minimum: int = 1, maximum: int = MAX_WIDTH,
             whole: bool = False) -> int:  # fmt: skip
        """The integer metadata `key` (under the architecture's prefix unless `whole`), in [minimum, maximum];
        a missing key takes `default`, or is refused without one. Some files store a value per layer: those
        must agree."""
        full = key if whole else f"{self.architecture}.{key}"
        value = self.metadata.get(full, default)
        if isinstance(value, list) and value:
            if len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.path.name}: metadata {full} differs between layers ({value[:6]}); not supported"
                )
            value = value[0]
        if value is None:
            raise GGUFError(f"{self.path.name} has no metadata {full}: not a complete {self.architecture} model")
        if type(value) is not int or not minimum <= value <= maximum:
            raise GGUFError(
                f"{self.path.name}: metadata {full} is {str(value)[:40]}, not an integer from {minimum} to {maximum}"
            )
        return value

    def _float(self, key: str, default: float) -> float:
        value = self._arch(key, default)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise GGUFError(
                f"{self.path.name}: metadata {self.architecture}.{key} is {str(value)[:40]}, not a positive number"
            )
        return float(value)

    def _string(self, key: str, limit: int) -> str | None:
        value = self.metadata.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            shown = f"{len(value)} characters long" if isinstance(value, str) else f"a {type(value).__name__}"
            raise GGUFError(f"{self.path.name}: metadata {key} is {shown}, not a string of at most {limit}")
        return value

    def _rope_scaling(self, head_dim: int) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type", "none")
        if ROPE_FREQS in self.tensors:
            if kind not in ("none", "linear") or (kind == "linear" and self._arch("rope.scaling.factor", 1.0) != 1.0):
                raise UnsupportedModelError(f"{self.path.name}: rope_freqs combined with {kind} rope scaling")
            self._check_shape(ROPE_FREQS, (head_dim // 2,))
            factors = self.dequantized(ROPE_FREQS).reshape(-1)
            if not np.all(np.isfinite(factors) & (factors > 0)):
                raise GGUFError(f"{self.path.name}: tensor {ROPE_FREQS} holds factors that are not positive numbers")
            return {"rope_type": "freq_factors", "factors": factors.tolist()}
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._float("rope.scaling.factor", 1.0)}
        raise UnsupportedModelError(
            f"{self.path.name}: rope scaling {str(kind)[:40]!r} is not supported for GGUF input "
            "(none, linear and llama3 are)"
        )

    def _check_shape(self, name: str, shape: tuple[int, ...], optional: bool = False) -> None:
        if name not in self.tensors:
            if optional:
                return
            raise GGUFError(f"{self.path.name} has no tensor {name}: not a complete {self.architecture} model")
        if self.tensors[name].shape != shape:
            raise GGUFError(
                f"{self.path.name}: tensor {name} has shape {list(self.tensors[name].shape)}, "
                f"expected {list(shape)} from the metadata"
            )

    def _check_tensors(self, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ff: int) -> None:
        """Every tensor the builder reads is present with the shape the metadata implies ([out, in])."""
        q, kv = heads * head_dim, kv_heads * head_dim
        vocab = self.shape("token_embd.weight")[0]
        self._check_shape("token_embd.weight", (vocab, hidden))
        self._check_shape("output.weight", (vocab, hidden), optional=True)
        self._check_shape("output_norm.weight", (hidden,))
        shapes = {
            "attn_norm.weight": (hidden,),
            "attn_q.weight": (q, hidden),
            "attn_k.weight": (kv, hidden),
            "attn_v.weight": (kv, hidden),
            "attn_output.weight": (hidden, q),
            "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (ff, hidden),
            "ffn_up.weight": (ff, hidden),
            "ffn_down.weight": (hidden, ff),
        }
        if "blk.0.attn_q.bias" in self.tensors:
            shapes |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        for i in range(layers):
            for part, shape in shapes.items():
                self._check_shape(f"blk.{i}.{part}", shape)
        beyond = [name for name in self.tensors if (m := _LAYER_NAME.fullmatch(name)) and int(m.group(1)) >= layers]
        if beyond:
            raise GGUFError(f"{self.path.name}: tensor {beyond[0]} lies beyond block_count {layers}")

    def config(self) -> dict[str, Any]:
        """The Hugging Face-style config.json of this model, for `builder.config.decoder_config`.

        Checks every value it reads (and every tensor's shape against them) first."""
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {arch[:40]!r} is not supported "
                f"(ortspec exports GGUFs of the {' and '.join(ARCHITECTURES)} architectures)"
            )
        if self._int("expert_count", 0, minimum=0) > 0:
            raise UnsupportedModelError(f"{self.path.name}: mixture-of-experts GGUFs are not supported")
        unknown = [name for name in self.tensors if hf_tensor_name(name) is None and name != ROPE_FREQS]
        if unknown:
            raise UnsupportedModelError(
                f"{self.path.name}: tensors the builder does not reproduce: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        for required in ("token_embd.weight", "blk.0.attn_q.weight"):
            if required not in self.tensors:
                raise GGUFError(f"{self.path.name} has no tensor {required}: not a complete {arch} model")
        layers = self._int("block_count", maximum=MAX_LAYERS)
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        kv_heads = self._int("attention.head_count_kv", heads, maximum=heads)
        if heads % kv_heads:
            raise GGUFError(f"{self.path.name}: {heads} attention heads do not divide into {kv_heads} key/value heads")
        head_dim = self._int("attention.key_length", max(1, self.shape("blk.0.attn_q.weight")[0] // heads))
        if self._int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedModelError(f"{self.path.name}: key and value head sizes differ; not supported")
        if head_dim % 2:
            raise GGUFError(f"{self.path.name}: head size {head_dim} is odd; rotary embeddings need an even one")
        rotary = self._int("rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise UnsupportedModelError(
                f"{self.path.name}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported"
            )
        ff = self._int("feed_forward_length")
        self._check_tensors(layers, hidden, heads, kv_heads, head_dim, ff)
        vocab_rows = self.shape("token_embd.weight")[0]
        if vocab_rows > MAX_VOCAB:
            raise GGUFError(f"{self.path.name}: tensor token_embd.weight has {vocab_rows} rows (at most {MAX_VOCAB})")
        self._string("tokenizer.chat_template", MAX_CHAT_TEMPLATE_CHARS)
        config: dict[str, Any] = {
            "model_type": arch,
            "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
            "_name_or_path": self._string("general.name", MAX_NAME_CHARS) or self.path.stem,
            "vocab_size": vocab_rows,
            "hidden_size": hidden,
            "intermediate_size": ff,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self._float("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._float("rope.freq_base", 10000.0),
            "rope_scaling": self._rope_scaling(head_dim),
            "max_position_embeddings": self._int("context_length", 4096, maximum=MAX_CONTEXT),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "torch_dtype": "float32",
        }
        if arch == "qwen2":
            config["use_sliding_window"] = False
        return config | self.special_ids()

    def special_ids(self) -> dict[str, Any]:
        """bos/eos/pad ids for config.json; eos lists every end-of-generation id the file names."""
        rows = self.shape("token_embd.weight")[0] if "token_embd.weight" in self.tensors else MAX_VOCAB

        def token(key: str) -> int:
            return self._int(f"tokenizer.ggml.{key}_token_id", minimum=0, maximum=rows - 1, whole=True)

        ids: dict[str, Any] = {}
        for key, name in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
            if f"tokenizer.ggml.{key}_token_id" in self.metadata:
                ids[name] = token(key)
        eos = [token(kind) for kind in ("eos", "eot", "eom") if f"tokenizer.ggml.{kind}_token_id" in self.metadata]
        if eos:
            eos = sorted(set(eos), key=eos.index)
            ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return ids

    def generation_config(self) -> dict[str, Any]:
        """The generation_config.json equivalent: the special ids (GGUF files carry no sampling defaults)."""
        return self.special_ids()

    def source_info(self) -> dict[str, Any]:
        """What the manifest records about the GGUF a model was exported from."""
        return {
            "format": "gguf",
            "architecture": self.architecture,
            "name": self._string("general.name", MAX_NAME_CHARS),
            "tensor_types": self.tensor_types(),
        }

    def dequantized(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` as float32 in its numpy shape (a new array), or only `rows` (start, stop) of its
        first axis."""
        from gguf.quants import dequantize

        info = self.tensors[name]
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        data = self.file.data(name, rows)
        if data.size == 0:
            return np.zeros(shape, np.float32)  # gguf's dequantizers cannot reshape nothing
        try:
            w = dequantize(data, info.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{self.path.name}: tensor {name} has type {info.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from exc
        w = np.array(w, dtype=np.float32).reshape(shape)
        if info.tensor_type.name not in ("F32", "F16", "BF16", "F64"):
            self.check_finite(name, w)
        return w

    def check_finite(self, name: str, *arrays: np.ndarray | None) -> None:
        """Refuse block scales (or values) that are NaN or infinite: no model holds them, and they would reach
        the package as NaN logits."""
        if not all(a is None or np.isfinite(a).all() for a in arrays):
            raise GGUFError(f"{self.path.name}: tensor {name} holds a block scale that is not a finite number")


@lru_cache(maxsize=4)
def _open(path: Path, mtime: float) -> GGUFModel:
    return GGUFModel(path)


def open_gguf(path: str | Path) -> GGUFModel:
    """A (cached) GGUFModel: parsing the metadata of a real file takes seconds, and export reads it thrice."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    return _open(path, path.stat().st_mtime)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the builder has no use for it."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    return None


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute`: per head, rows [0, 2, 4, ..., 1, 3, 5, ...] -> halves.

    llama.cpp reshapes [heads * d, ...] to [heads, 2, d/2, ...] and swaps the middle axes, so the
    two rotary halves of each head become interleaved; the inverse reshapes to [heads, d/2, 2, ...].
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """The tensors of a GGUF file under Hugging Face names, dequantized to float32 (`get`, `rows`), or as the
    file's own blocks (`blocks`) for the types `gguf_raw` reads.

    Same interface as `safetensors_io.SafetensorsCheckpoint` (`in`, `names`, `get`, `dtype`), so `WeightReader`
    reads either.
    """

    def __init__(self, model: GGUFModel | str | Path) -> None:
        self.model = model if isinstance(model, GGUFModel) else open_gguf(model)
        config = self.model.config()  # refuses unsupported architectures and tensors
        self._permute_heads: dict[str, int] = {}
        if config["model_type"] == "llama":
            self._permute_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        self._where = {hf: name for name in self.model.tensors if (hf := hf_tensor_name(name)) is not None}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def dtype(self, name: str) -> str:
        return self.model.tensors[self._where[name]].tensor_type.name

    def shape(self, name: str) -> list[int]:
        return list(self.model.tensors[self._where[name]].shape)

    def gguf_name(self, name: str) -> str:
        return self._where[name]

    def readable(self, name: str) -> bool:
        """Whether `blocks` reads tensor `name` (a 2-D tensor of a type `gguf_raw` reads)."""
        return self.dtype(name) in LAYOUTS and len(self.shape(name)) == 2

    def blocks(self, name: str, rows: tuple[int, int] | None = None) -> Blocks:
        """Tensor `name` [N, K] (or its `rows` (start, stop)) as the file's blocks along K, q/k rows un-permuted."""
        info = self.model.tensors[self._where[name]]
        raw = self.model.file.data(info.name, rows)
        blocks = read_blocks(raw.reshape(-1, info.row_bytes), info.tensor_type.name)
        self.model.check_finite(info.name, blocks.scales, blocks.offsets)
        projection = name.split(".")[-2]
        if projection in self._permute_heads:
            if rows is not None:
                raise ValueError(f"{name} is stored with its rotary rows permuted; read it whole")
            order = unpermute_rotary_rows(np.arange(info.shape[0]), self._permute_heads[projection])
            blocks = take(blocks, order)
        return blocks

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"the GGUF file has no tensor for {name}")
        w = self.model.dequantized(self._where[name])
        projection = name.split(".")[-2]
        if projection in self._permute_heads:
            w = unpermute_rotary_rows(w, self._permute_heads[projection])
        return w

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name`, dequantized alone (`SafetensorsCheckpoint.rows`)."""
        if name not in self._where:
            raise KeyError(f"the GGUF file has no tensor for {name}")
        if name.split(".")[-2] in self._permute_heads:
            raise ValueError(f"{name} is stored with its rotary rows permuted; read it whole")
        return self.model.dequantized(self._where[name], (start, stop))
