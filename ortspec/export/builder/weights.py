"""Checkpoint tensors -> the builder's layout: MatMul weights as [in, out], fused q/k/v and gate/up.

Heads whose size is not a multiple of 16 (which GroupQueryAttention refuses) are zero-padded:
q/k per rotary half, so rotation pairs stay paired; v at the end, with matching zero rows in the
output projection. Padded dimensions add nothing to scores or outputs, so results are exact.

With partial rotary (phi3), GroupQueryAttention still rotates whole heads, pairing dim j with
j + half: each q/k head is reordered so its rotary halves open the two halves and the dims that
do not rotate follow them, where the rotary tables hold cos 1, sin 0. q and k get the same order,
so their dot products, hence the attention, are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..quantize.gguf_raw import GGUFWeight, rearranged, whole
from .config import DecoderConfig
from .gguf_io import GGUFCheckpoint
from .safetensors_io import SafetensorsCheckpoint


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // 16) * 16


def _pad_last(array: np.ndarray, size: int) -> np.ndarray:
    pad = size - array.shape[-1]
    return array if pad == 0 else np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, pad)])


def pad_rotary_heads(w: np.ndarray, heads: int, head_dim: int, padded: int, rotary: int | None = None) -> np.ndarray:
    """[..., heads*head_dim] -> [..., heads*padded]: each half of each head holds half of its `rotary`
    dims, then half of the rest, then zeros."""
    lead = w.shape[:-1]
    per_head = w.reshape(*lead, heads, head_dim)
    rotary = rotary or head_dim
    r, rest = rotary // 2, (head_dim - rotary) // 2
    first = np.concatenate([per_head[..., :r], per_head[..., rotary : rotary + rest]], axis=-1)
    second = np.concatenate([per_head[..., r:rotary], per_head[..., rotary + rest :]], axis=-1)
    halves = np.stack([first, second], axis=-2)  # [..., heads, 2, head_dim // 2]
    return _pad_last(halves, padded // 2).reshape(*lead, heads * padded)


def pad_value_heads(w: np.ndarray, heads: int, head_dim: int, padded: int) -> np.ndarray:
    """[..., heads*head_dim] -> [..., heads*padded], padding the end of each head."""
    lead = w.shape[:-1]
    return _pad_last(w.reshape(*lead, heads, head_dim), padded).reshape(*lead, heads * padded)


class TableColumns:
    """A checkpoint's table [rows, K] as the MatMul weight W = table.T [K, rows], read a range of its columns
    (the table's rows) at a time: the quantizer never holds a large table (a 128k-token embedding) whole."""

    def __init__(self, checkpoint: SafetensorsCheckpoint | GGUFCheckpoint, name: str) -> None:
        rows, k = checkpoint.shape(name)
        self.ckpt, self.name, self.shape = checkpoint, name, (k, rows)

    def columns(self, start: int, stop: int) -> np.ndarray:
        return self.ckpt.rows(self.name, start, stop).T


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    qkv: np.ndarray | GGUFWeight  # [hidden, (heads + 2 kv_heads) * padded_head_dim]
    qkv_bias: np.ndarray | None
    q_norm: np.ndarray | None  # [padded_head_dim], in the q/k head layout
    k_norm: np.ndarray | None
    o_proj: np.ndarray | GGUFWeight  # [heads * padded_head_dim, hidden]
    post_attn_norm: np.ndarray | None  # gemma2/3 only
    mlp_norm: np.ndarray
    post_mlp_norm: np.ndarray | None  # gemma2/3 only
    gate_up: np.ndarray | GGUFWeight  # [hidden, 2 * intermediate]
    down: np.ndarray | GGUFWeight  # [intermediate, hidden]


class WeightReader:
    """Reads and reshapes the tensors of one Llama-family checkpoint for the graph builder.

    With `gguf_blocks` (set by a quantizing graph builder), the MatMul weights of a GGUF file come as
    `GGUFWeight`s: the file's blocks, rearranged as the float32 weight would be, for the quantizer to keep."""

    def __init__(self, checkpoint: SafetensorsCheckpoint | GGUFCheckpoint, cfg: DecoderConfig) -> None:
        self.ckpt = checkpoint
        self.cfg = cfg
        self.padded = padded_head_dim(cfg.head_dim)
        self.gguf_blocks = False

    def norm(self, name: str) -> np.ndarray:
        return self.ckpt.get(name) + np.float32(self.cfg.norm_offset)

    def linear(self, name: str) -> np.ndarray:
        """A torch Linear weight [out, in] as a MatMul weight [in, out]: a transposed view, not a copy (the
        quantizer reads it a slice of output columns, i.e. of the stored rows, at a time)."""
        return self.ckpt.get(name).T

    def projection(self, name: str) -> np.ndarray | GGUFWeight:
        """`linear(name)`, or with `gguf_blocks` a GGUF file's blocks for it."""
        ckpt = self.ckpt
        if self.gguf_blocks and isinstance(ckpt, GGUFCheckpoint):
            return self._gguf(name, whole(lambda: ckpt.blocks(name)), lambda: self.linear(name))
        return self.linear(name)

    def _gguf(self, name: str, read: Callable, fallback: Callable[[], Any]) -> GGUFWeight:
        ckpt = self.ckpt
        assert isinstance(ckpt, GGUFCheckpoint)
        rows, k = ckpt.shape(name)
        readable = ckpt.readable(name)
        return GGUFWeight((k, rows), (ckpt.gguf_name(name),), (ckpt.dtype(name),), read if readable else None, fallback)

    def embedding(self) -> np.ndarray:
        return self.ckpt.get("model.embed_tokens.weight")

    def embedding_columns(self) -> TableColumns | GGUFWeight:
        """The embedding table's transpose (the tied lm_head's weight), read as the quantizer asks."""
        return self._table("model.embed_tokens.weight")

    def lm_head_columns(self) -> TableColumns | GGUFWeight:
        """`lm_head()`, read as the quantizer asks."""
        return self.embedding_columns() if self.tied else self._table("lm_head.weight")

    def _table(self, name: str) -> TableColumns | GGUFWeight:
        """A table's transpose read a range of its rows at a time (as blocks, or as float32)."""
        ckpt = self.ckpt
        if self.gguf_blocks and isinstance(ckpt, GGUFCheckpoint):
            rows = lambda start, stop: ckpt.blocks(name, (start, stop))  # noqa: E731
            return self._gguf(name, rows, lambda: TableColumns(ckpt, name))
        return TableColumns(ckpt, name)

    @property
    def tied(self) -> bool:
        """Whether the lm_head is the embedding table (transposed)."""
        return self.cfg.tie_embeddings or "lm_head.weight" not in self.ckpt

    def lm_head(self) -> np.ndarray:
        if self.tied:
            return self.embedding().T
        return self.linear("lm_head.weight")

    def final_norm(self) -> np.ndarray:
        return self.norm("model.norm.weight")

    def _qkv(self, prefix: str) -> tuple[np.ndarray | GGUFWeight, np.ndarray | None]:
        cfg = self.cfg
        q_size, kv_size = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        pad, rot = self.padded, cfg.rotary

        def heads(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [
                    pad_rotary_heads(q, cfg.heads, cfg.head_dim, pad, rot),
                    pad_rotary_heads(k, cfg.kv_heads, cfg.head_dim, pad, rot),
                    pad_value_heads(v, cfg.kv_heads, cfg.head_dim, pad),
                ],
                axis=-1,
            )

        arrange: Callable[..., np.ndarray] = heads
        if cfg.fused_weights:
            parts: Sequence[np.ndarray | GGUFWeight] = [self.projection(f"{prefix}.qkv_proj.weight")]
            arrange = lambda fused: heads(*np.split(fused, [q_size, q_size + kv_size], axis=-1))  # noqa: E731
        else:
            parts = [self.projection(f"{prefix}.{n}_proj.weight") for n in "qkv"]
        bias = None
        if f"{prefix}.q_proj.bias" in self.ckpt:
            bias = heads(*(self.ckpt.get(f"{prefix}.{n}_proj.bias") for n in "qkv"))
        return rearranged(arrange, parts), bias

    def head_norm(self, name: str) -> np.ndarray:
        """A q/k norm's weight in the heads' layout (padding entries 0: they scale zeros)."""
        return pad_rotary_heads(self.norm(name), 1, self.cfg.head_dim, self.padded, self.cfg.rotary)

    def _o_proj(self, prefix: str) -> np.ndarray | GGUFWeight:
        cfg = self.cfg
        w = self.projection(f"{prefix}.o_proj.weight")  # [heads*head_dim, hidden]
        if self.padded == cfg.head_dim:
            return w

        def pad(w: np.ndarray) -> np.ndarray:
            rows = w.reshape(cfg.heads, cfg.head_dim, cfg.hidden)
            padded = np.pad(rows, [(0, 0), (0, self.padded - cfg.head_dim), (0, 0)])
            return padded.reshape(cfg.heads * self.padded, cfg.hidden)

        if isinstance(w, GGUFWeight):  # zero rows inside K's blocks: the quantizer gets float32 (and names it)
            shape = (cfg.heads * self.padded, cfg.hidden)
            return replace(w, shape=shape, read=None, fallback=lambda: pad(w.fallback()))
        return pad(w)

    def _gate_up(self, prefix: str) -> np.ndarray | GGUFWeight:
        if self.cfg.fused_weights:
            return self.projection(f"{prefix}.gate_up_proj.weight")
        parts = [self.projection(f"{prefix}.gate_proj.weight"), self.projection(f"{prefix}.up_proj.weight")]
        return rearranged(lambda gate, up: np.concatenate([gate, up], -1), parts)

    def layer(self, i: int) -> LayerWeights:
        cfg = self.cfg
        p = f"model.layers.{i}"
        qkv, bias = self._qkv(f"{p}.self_attn")
        sandwich = cfg.sandwich_norms
        return LayerWeights(
            attn_norm=self.norm(f"{p}.input_layernorm.weight"),
            qkv=qkv,
            qkv_bias=bias,
            q_norm=self.head_norm(f"{p}.self_attn.q_norm.weight") if cfg.qk_norm else None,
            k_norm=self.head_norm(f"{p}.self_attn.k_norm.weight") if cfg.qk_norm else None,
            o_proj=self._o_proj(f"{p}.self_attn"),
            post_attn_norm=self.norm(f"{p}.post_attention_layernorm.weight") if sandwich else None,
            mlp_norm=self.norm(
                f"{p}.pre_feedforward_layernorm.weight" if sandwich else f"{p}.post_attention_layernorm.weight"
            ),
            post_mlp_norm=self.norm(f"{p}.post_feedforward_layernorm.weight") if sandwich else None,
            gate_up=self._gate_up(f"{p}.mlp"),
            down=self.projection(f"{p}.mlp.down_proj.weight"),
        )
