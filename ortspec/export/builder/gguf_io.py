"""Read GGUF files (llama.cpp's format) with the `gguf` package and numpy alone.

A GGUF file holds the config (metadata keys such as `llama.block_count`), the tokenizer
(`tokenizer.ggml.*`) and the weights, many of them block-quantized (Q4_0, Q4_1, Q8_0, K-quants...).
`GGUFModel.config()` turns the metadata into the Hugging Face-style config dict that
`builder.config.decoder_config` reads, and `GGUFCheckpoint` serves the weights under Hugging Face
tensor names, dequantized to float32, so `WeightReader` builds the same graph as from safetensors.

llama.cpp's converter permutes the rows of the q/k projections of Llama-architecture models for its
interleaved rotary layout; `GGUFCheckpoint` undoes that permutation (Qwen2 is stored unpermuted).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .config import UnsupportedModelError

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


class GGUFError(ValueError):
    """A GGUF file cannot be read or lacks what export needs."""


def _field_value(field: Any) -> Any:
    """A metadata value as Python (str, int, float, bool, or a list of them); works on gguf >= 0.10."""
    from gguf import GGUFValueType

    def scalar(kind: Any, part: np.ndarray) -> Any:
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part[0]
        if kind == GGUFValueType.BOOL:
            return bool(value)
        return float(value) if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) else int(value)

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        if len(field.types) > 2:
            raise GGUFError(f"GGUF metadata {field.name} is a nested array, which ortspec does not read")
        item = field.types[1] if len(field.types) > 1 else GGUFValueType.UINT8
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if item in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            return [float(field.parts[i][0]) for i in field.data]
        if item == GGUFValueType.BOOL:
            return [bool(field.parts[i][0]) for i in field.data]
        return [int(field.parts[i][0]) for i in field.data]
    return scalar(kind, field.parts[field.data[0]])


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


class GGUFModel:
    """One GGUF file: metadata as a dict, tensors by GGUF name (memory-mapped, read on demand)."""

    def __init__(self, path: Path) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as exc:  # a base dependency, but say so plainly if it is missing
            raise GGUFError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from exc
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
        except Exception as exc:
            raise GGUFError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.metadata: dict[str, Any] = {name: _field_value(field) for name, field in reader.fields.items()}
        self.tensors = {t.name: t for t in reader.tensors}
        if int(self.metadata.get("split.count", 1)) > 1:
            raise GGUFError(
                f"{self.path.name} is one part of a split GGUF ({self.metadata['split.count']} files); "
                "merge the parts first (llama-gguf-split --merge)"
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy (row-major) order: GGUF lists dimensions innermost first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type (F32, Q4_1, ...) the file holds."""
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _uniform(self, key: str, default: Any = None) -> Any:
        """A per-model value that some files store per layer: refuse layers that differ."""
        value = self._arch(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(f"{self.path.name}: {key} differs between layers ({value}); not supported")
            value = value[0]
        return value

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type", "none")
        if ROPE_FREQS in self.tensors:
            if kind not in ("none", "linear") or (kind == "linear" and self._arch("rope.scaling.factor", 1.0) != 1.0):
                raise UnsupportedModelError(f"{self.path.name}: rope_freqs combined with {kind} rope scaling")
            from gguf.quants import dequantize

            t = self.tensors[ROPE_FREQS]
            factors = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            return {"rope_type": "freq_factors", "factors": factors.tolist()}
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._arch("rope.scaling.factor", 1.0))}
        raise UnsupportedModelError(
            f"{self.path.name}: rope scaling {kind!r} is not supported for GGUF input (none, linear and llama3 are)"
        )

    def config(self) -> dict[str, Any]:
        """The Hugging Face-style config.json of this model, for `builder.config.decoder_config`."""
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported "
                f"(ortspec exports GGUFs of the {' and '.join(ARCHITECTURES)} architectures)"
            )
        if int(self._arch("expert_count", 0) or 0) > 0:
            raise UnsupportedModelError(f"{self.path.name}: mixture-of-experts GGUFs are not supported")
        unknown = [name for name in self.tensors if hf_tensor_name(name) is None and name != ROPE_FREQS]
        if unknown:
            raise UnsupportedModelError(
                f"{self.path.name}: tensors the builder does not reproduce: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        for required in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"):
            if required not in self.tensors:
                raise GGUFError(f"{self.path.name} has no tensor {required}: not a complete {arch} model")
        heads = int(self._uniform("attention.head_count"))
        kv_heads = int(self._uniform("attention.head_count_kv", heads))
        hidden = int(self._arch("embedding_length"))
        head_dim = int(self._arch("attention.key_length", 0) or self.shape("blk.0.attn_q.weight")[0] // heads)
        if int(self._arch("attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModelError(f"{self.path.name}: key and value head sizes differ; not supported")
        rotary = int(self._arch("rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise UnsupportedModelError(
                f"{self.path.name}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported"
            )
        vocab_rows = self.shape("token_embd.weight")[0]
        config: dict[str, Any] = {
            "model_type": arch,
            "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
            "_name_or_path": str(self.metadata.get("general.name", self.path.stem)),
            "vocab_size": vocab_rows,
            "hidden_size": hidden,
            "intermediate_size": int(self._uniform("feed_forward_length")),
            "num_hidden_layers": int(self._arch("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": int(self._arch("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "torch_dtype": "float32",
        }
        if arch == "qwen2":
            config["use_sliding_window"] = False
        return config | self.special_ids()

    def special_ids(self) -> dict[str, Any]:
        """bos/eos/pad ids for config.json; eos lists every end-of-generation id the file names."""
        meta = self.metadata
        ids: dict[str, Any] = {}
        for key, name in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
            if f"tokenizer.ggml.{key}_token_id" in meta:
                ids[name] = int(meta[f"tokenizer.ggml.{key}_token_id"])
        keys = [f"tokenizer.ggml.{kind}_token_id" for kind in ("eos", "eot", "eom")]
        eos = [int(meta[key]) for key in keys if key in meta]
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
            "name": self.metadata.get("general.name"),
            "tensor_types": self.tensor_types(),
        }


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
    """The tensors of a GGUF file under Hugging Face names, dequantized to float32.

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

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        if name not in self._where:
            raise KeyError(f"the GGUF file has no tensor for {name}")
        gguf_name = self._where[name]
        tensor = self.model.tensors[gguf_name]
        try:
            w = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{self.model.path.name}: tensor {gguf_name} has type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from exc
        w = np.array(w, dtype=np.float32).reshape(self.model.shape(gguf_name))
        projection = name.split(".")[-2]
        if projection in self._permute_heads:
            w = unpermute_rotary_rows(w, self._permute_heads[projection])
        return w
