"""The names of a causal LM graph's inputs and outputs: one place for the builder, the package writer,
the decoder and the KV cache, so that they cannot drift apart.

Two KV layouts exist, told apart by the graph's inputs: a graph that takes `seqlens_k` (the builder's,
GroupQueryAttention) writes its cache in place in a shared buffer; one without (optimum's) returns
`present` = concat(`past`, new).
"""

from __future__ import annotations

from collections.abc import Collection

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"  # concat graphs
POSITION_IDS = "position_ids"  # some concat graphs
SEQLENS_K = "seqlens_k"  # shared-buffer graphs: total length - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # shared-buffer graphs
FEATURES = "features"  # draft heads: the target's features, one row per token
LOGITS_TO_KEEP = "logits_to_keep"  # builder decoder graphs: score only the last N positions (0: all), int64 [1]
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"  # builder graphs: the final-normed features the lm_head reads

KV_KINDS = ("key", "value")
PAST_PREFIX = "past_key_values."
SHARED_BUFFER = "shared-buffer"
CONCAT = "concat"
KV_LAYOUTS = (CONCAT, SHARED_BUFFER)


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_names(layers: int) -> list[str]:
    """Cache inputs, layer by layer, key before value."""
    return [past_name(i, kind) for i in range(layers) for kind in KV_KINDS]


def present_names(layers: int) -> list[str]:
    """Cache outputs, in the same order as `past_names`."""
    return [present_name(i, kind) for i in range(layers) for kind in KV_KINDS]


def count_layers(input_names: Collection[str]) -> int:
    """Layers of a graph, counted from its cache inputs."""
    return sum(name.startswith(PAST_PREFIX) and name.endswith(".key") for name in input_names)


def kv_layout(input_names: Collection[str]) -> str:
    """The KV layout of a graph with these inputs."""
    return SHARED_BUFFER if SEQLENS_K in input_names else CONCAT
