"""Read GGUF files (llama.cpp's format) with numpy and the `gguf` package's tensor types alone.

A GGUF file holds the config (metadata keys such as `llama.block_count`), the tokenizer
(`tokenizer.ggml.*`) and the weights, many of them block-quantized (Q4_0, Q4_1, Q8_0, K-quants...).
`GGUFModel.config()` turns the metadata into the Hugging Face-style config dict that
`builder.config.decoder_config` reads, and `GGUFCheckpoint` serves the weights under Hugging Face
tensor names, dequantized to float32, so `WeightReader` builds the same graph as from safetensors.

The architectures read (llama incl. Mistral-style, qwen2, qwen3, gemma3, phi3) and what llama.cpp's
converter did to their tensors (names; llama's permuted q/k rows; Gemma's norms stored as 1 + w) are in
`gguf_arch`; `GGUFCheckpoint` undoes those transforms.

The header is parsed with bounds (`gguf_file`); `GGUFModel.config()` then checks every value the
builder uses (counts, sizes, every tensor's presence and shape) and refuses a bad one in one line
naming the key or tensor, so no file reaches the builder to fail there with a traceback, and none
makes a package the loader would refuse.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..quantize.gguf_raw import FLOAT_TYPES, LAYOUTS, Blocks, read_blocks, take
from .config import UnsupportedModelError
from .gguf_arch import (
    ARCHITECTURES,
    LAYER_NAME,
    LONG_ROPE,
    ROPE_FREQS,
    Architecture,
    hf_tensor_name,
    is_norm,
    layer_shapes,
)
from .gguf_file import GGUFError, GGUFFile, TensorInfo

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>")

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

    def _check_tensors(self, spec: Architecture, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                       ff: int) -> None:  # fmt: skip
        """Every tensor the builder reads is present with the shape the metadata implies ([out, in])."""
        vocab = self.shape("token_embd.weight")[0]
        self._check_shape("token_embd.weight", (vocab, hidden))
        self._check_shape("output.weight", (vocab, hidden), optional=True)
        self._check_shape("output_norm.weight", (hidden,))
        biased = "blk.0.attn_q.bias" in self.tensors
        shapes = layer_shapes(spec, hidden, heads * head_dim, kv_heads * head_dim, head_dim, ff, biased)
        for i in range(layers):
            for part, shape in shapes.items():
                self._check_shape(f"blk.{i}.{part}", shape)
        beyond = [name for name in self.tensors if (m := LAYER_NAME.fullmatch(name)) and int(m.group(1)) >= layers]
        if beyond:
            raise GGUFError(f"{self.path.name}: tensor {beyond[0]} lies beyond block_count {layers}")

    def _spec(self) -> Architecture:
        """The file's architecture, refused in one line unless the builder reproduces it."""
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {arch[:40]!r} is not supported "
                f"(ortspec exports GGUFs of the {', '.join(ARCHITECTURES)} architectures)"
            )
        return ARCHITECTURES[arch]

    def _head_dim(self, spec: Architecture, heads: int, kv_heads: int) -> int:
        """attention.key_length (Mistral-style, Qwen3 and Gemma 3 heads are not hidden / heads wide), else what
        the first layer's query rows imply."""
        rows = self.shape(f"blk.0.{spec.query_tensor}")[0]
        head_dim = self._int("attention.key_length", max(1, rows // (heads + 2 * kv_heads if spec.fused else heads)))
        if self._int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedModelError(f"{self.path.name}: key and value head sizes differ; not supported")
        if head_dim % 2:
            raise GGUFError(f"{self.path.name}: head size {head_dim} is odd; rotary embeddings need an even one")
        return head_dim

    def _rotary(self, spec: Architecture, head_dim: int) -> int:
        rotary = self._int("rope.dimension_count", head_dim, maximum=head_dim)
        if rotary != head_dim and (spec.name != "phi3" or rotary % 2):
            raise UnsupportedModelError(
                f"{self.path.name}: partial rotary embeddings ({rotary} of {head_dim} dims) are supported "
                "for phi3 only (an even count)"
            )
        return rotary

    def config(self) -> dict[str, Any]:
        """The Hugging Face-style config.json of this model, for `builder.config.decoder_config`.

        Checks every value it reads (and every tensor's shape against them) first."""
        spec = self._spec()
        arch = spec.name
        if self._int("expert_count", 0, minimum=0) > 0:
            raise UnsupportedModelError(f"{self.path.name}: mixture-of-experts GGUFs are not supported")
        unknown = [
            name for name in self.tensors if hf_tensor_name(spec, name) is None and name not in spec.extra_tensors
        ]
        if unknown:
            raise UnsupportedModelError(
                f"{self.path.name}: tensors the builder does not reproduce: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        for required in ("token_embd.weight", f"blk.0.{spec.query_tensor}"):
            if required not in self.tensors:
                raise GGUFError(f"{self.path.name} has no tensor {required}: not a complete {arch} model")
        layers = self._int("block_count", maximum=MAX_LAYERS)
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        kv_heads = self._int("attention.head_count_kv", heads, maximum=heads)
        if heads % kv_heads:
            raise GGUFError(f"{self.path.name}: {heads} attention heads do not divide into {kv_heads} key/value heads")
        head_dim = self._head_dim(spec, heads, kv_heads)
        rotary = self._rotary(spec, head_dim)
        ff = self._int("feed_forward_length")
        self._check_tensors(spec, layers, hidden, heads, kv_heads, head_dim, ff)
        vocab_rows = self.shape("token_embd.weight")[0]
        if vocab_rows > MAX_VOCAB:
            raise GGUFError(f"{self.path.name}: tensor token_embd.weight has {vocab_rows} rows (at most {MAX_VOCAB})")
        self._string("tokenizer.chat_template", MAX_CHAT_TEMPLATE_CHARS)
        config: dict[str, Any] = {
            "model_type": spec.model_type,
            "architectures": [spec.hf_class],
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
            "rope_scaling": None if spec.name == "phi3" else self._rope_scaling(head_dim),
            "max_position_embeddings": self._int("context_length", 4096, maximum=MAX_CONTEXT),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "torch_dtype": "float32",
        }
        config |= self._architecture_config(arch, layers, hidden, heads, head_dim, rotary)
        return config | self.special_ids()

    def _architecture_config(self, arch: str, layers: int, hidden: int, heads: int, head_dim: int,
                             rotary: int) -> dict[str, Any]:  # fmt: skip
        """The config.json keys one architecture adds to (or changes in) the common ones."""
        window = self._int("attention.sliding_window", 0, minimum=0, maximum=MAX_CONTEXT)
        if arch == "llama":  # a Mistral-style file that names its window (the converter writes none for llama)
            return (
                {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": window}
                if window
                else {}
            )
        if arch in ("qwen2", "qwen3"):
            return {"use_sliding_window": False}  # llama.cpp runs Qwen2/Qwen3 without a window
        if arch == "phi3":
            return {"sliding_window": window or None, **self._phi3_rope(head_dim, rotary)}
        return self._gemma3_config(layers, hidden, heads, head_dim, window)

    def _gemma3_config(self, layers: int, hidden: int, heads: int, head_dim: int, window: int) -> dict[str, Any]:
        """Gemma 3's sliding layers, their rope base, its attention scale and soft-capping, as llama.cpp reads them.

        Files carry no pattern and no query_pre_attn_scalar: llama.cpp makes every 6th layer global (unless
        attention.sliding_window_pattern says otherwise), gives sliding layers rope base 10000, and scales
        queries by head_dim ** -0.5, or by (hidden / heads) ** -0.5 for the 62-layer 27B, as Google's configs do.
        """
        capped = self._arch("final_logit_softcapping") is not None
        kinds = ["full_attention"] * layers
        if window:
            sliding = self._sliding_layers(layers, 6)
            kinds = ["sliding_attention" if s else "full_attention" for s in sliding]
        return {
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": window or None,
            "layer_types": kinds,
            "rope_local_base_freq": self._float("rope.freq_base_swa", 10000.0),
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "final_logit_softcapping": self._float("final_logit_softcapping", 1.0) if capped else None,
        }

    def _sliding_layers(self, layers: int, period: int) -> list[bool]:
        """Which layers use the sliding window: attention.sliding_window_pattern as llama.cpp reads it (a period
        n: every n-th layer global; or one flag per layer), else every `period`-th layer global."""
        key = f"{self.architecture}.attention.sliding_window_pattern"
        value = self.metadata.get(key, period)
        if isinstance(value, list):
            if len(value) != layers or any(type(v) is not bool for v in value):
                raise GGUFError(f"{self.path.name}: metadata {key} is not one true/false per layer ({layers})")
            return value
        period = self._int("attention.sliding_window_pattern", period, minimum=0, maximum=MAX_LAYERS)
        return [period == 0 or i % period < period - 1 for i in range(layers)]

    def _phi3_rope(self, head_dim: int, rotary: int) -> dict[str, Any]:
        """Phi-3's partial rotary and longrope (rope_factors_long/short tensors, original context length)."""
        config: dict[str, Any] = {}
        if rotary != head_dim:  # a factor that transformers' int(head_dim * factor) turns back into `rotary`
            factor = rotary / head_dim
            while int(head_dim * factor) < rotary:
                factor = math.nextafter(factor, 2.0)
            config["partial_rotary_factor"] = factor
        kind = self._arch("rope.scaling.type", "none")
        if kind not in ("none", "longrope", "su"):
            raise UnsupportedModelError(
                f"{self.path.name}: phi3 rope scaling {str(kind)[:40]!r} is not supported (longrope is)"
            )
        long, short = LONG_ROPE
        if long not in self.tensors and short not in self.tensors:
            return config
        for name in (long, short):
            self._check_shape(name, (rotary // 2,))
        factors = {"long_factor": self.dequantized(long), "short_factor": self.dequantized(short)}
        if not all(np.all(np.isfinite(f) & (f > 0)) for f in factors.values()):
            raise GGUFError(f"{self.path.name}: tensors {long}/{short} hold factors that are not positive numbers")
        scaling: dict[str, Any] = {"rope_type": "longrope", **{k: f.tolist() for k, f in factors.items()}}
        if self._arch("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = self._float("rope.scaling.attn_factor", 1.0)
        original = self._int("rope.scaling.original_context_length", maximum=MAX_CONTEXT)
        return config | {"rope_scaling": scaling, "original_max_position_embeddings": original}

    def special_ids(self) -> dict[str, Any]:
        """bos/eos/pad ids for config.json; eos lists every end-of-generation id the file names, then the
        control tokens that end chat turns."""
        rows = self.shape("token_embd.weight")[0] if "token_embd.weight" in self.tensors else MAX_VOCAB

        def token(key: str) -> int:
            return self._int(f"tokenizer.ggml.{key}_token_id", minimum=0, maximum=rows - 1, whole=True)

        ids: dict[str, Any] = {}
        for key, name in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
            if f"tokenizer.ggml.{key}_token_id" in self.metadata:
                ids[name] = token(key)
        eos = [token(kind) for kind in ("eos", "eot", "eom") if f"tokenizer.ggml.{kind}_token_id" in self.metadata]
        eos += [i for i in self._turn_ends if i < rows]
        if eos:
            eos = sorted(set(eos), key=eos.index)
            ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return ids

    @cached_property
    def _turn_ends(self) -> list[int]:
        """Control tokens that end a chat turn, found by their text as llama.cpp finds them: files name one
        eos (Gemma 3's <eos>, Phi-3's <|endoftext|>), their chats end with <end_of_turn>, <|end|>..."""
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []
        types = self.metadata.get("tokenizer.ggml.token_type") or []
        if len(types) != len(tokens):
            return []  # the tokenizer refuses such a file in one line
        return [i for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED) and tokens[i] in TURN_ENDS]

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
        if info.tensor_type.name not in FLOAT_TYPES:
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
        self.arch = ARCHITECTURES[self.model.architecture]
        self._permute_heads: dict[str, int] = {}
        if self.arch.permuted:
            self._permute_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        self._where = {hf: name for name in self.model.tensors if (hf := hf_tensor_name(self.arch, name)) is not None}

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
        return self._undo_converter(name, self.model.dequantized(self._where[name]))

    def _undo_converter(self, name: str, w: np.ndarray) -> np.ndarray:
        """The Hugging Face tensor from the stored one: q/k rows un-permuted (llama), norms un-shifted (gemma3)."""
        projection = name.split(".")[-2]
        if projection in self._permute_heads:
            w = unpermute_rotary_rows(w, self._permute_heads[projection])
        if self.arch.norm_shift and is_norm(name):
            w -= np.float32(self.arch.norm_shift)  # the builder adds Gemma's 1 back: the stored value again
        return w

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name`, dequantized alone (`SafetensorsCheckpoint.rows`)."""
        if name not in self._where:
            raise KeyError(f"the GGUF file has no tensor for {name}")
        if name.split(".")[-2] in self._permute_heads or (self.arch.norm_shift and is_norm(name)):
            raise ValueError(f"{name} is stored transformed by llama.cpp's converter; read it whole")
        return self.model.dequantized(self._where[name], (start, stop))
