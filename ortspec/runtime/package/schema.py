"""The manifest's schema: every field the runtime reads, with the JSON type it must have.

A hostile or hand-edited manifest must fail with a message naming the field (`target.num_layers`),
not with an AttributeError deep in the runtime. Format versions 1 and 2 share this schema: version 2
only added the draft kind "eagle-head", and the fields version 1 lacks (`kind`, `source_info`,
`training`) are optional. Fields not listed here are ignored (a newer minor writer may add some).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ortspec.runtime.package.graph_names import KV_LAYOUTS

KV_DTYPES = ("float32", "float16")  # the element types of a package's KV cache


@dataclass(frozen=True)
class Rule:
    """What one field must be: `accepts` decides, `expected` says it in words for the message."""

    expected: str
    accepts: Callable[[Any], bool]
    required: bool = True
    fields: Mapping[str, Rule] | None = None  # an object: the rules of its fields
    items: Rule | None = None  # a list: the rule of its items


def integer(minimum: int) -> Rule:
    return Rule(f"an integer >= {minimum}", lambda v: type(v) is int and v >= minimum)  # not a bool


def one_of(*values: str) -> Rule:
    return Rule(f"one of {', '.join(map(repr, values))}", lambda v: isinstance(v, str) and v in values)


def optional(rule: Rule) -> Rule:
    return dataclasses.replace(rule, required=False)


def nullable(rule: Rule) -> Rule:
    return dataclasses.replace(
        rule, expected=f"{rule.expected} or null", accepts=lambda v: v is None or rule.accepts(v)
    )


def record(fields: Mapping[str, Rule]) -> Rule:
    return Rule("an object", lambda v: isinstance(v, dict), fields=fields)


def list_of(item: Rule) -> Rule:
    return Rule("a list", lambda v: isinstance(v, list), items=item)


STRING = Rule("a string", lambda v: isinstance(v, str))
PATH = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
SHA256 = Rule("64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)
OBJECT = Rule("an object", lambda v: isinstance(v, dict))
POSITIVE = integer(1)
TOKEN_ID = integer(0)

FILE = record({"path": PATH, "size": integer(0), "sha256": SHA256})
QUANTIZATION = record(
    {
        "method": optional(STRING),
        **{name: optional(integer(0)) for name in ("bits", "block_size", "accuracy_level", "quantized_nodes")},
    }
)
MODEL = record(
    {
        "role": one_of("target", "draft"),
        "family": STRING,
        "exporter": STRING,
        "onnx": PATH,
        "files": list_of(FILE),
        "kv_layout": one_of(*KV_LAYOUTS),
        "num_layers": POSITIVE,
        "num_kv_heads": POSITIVE,
        "head_dim": POSITIVE,
        "vocab_size": POSITIVE,
        "max_positions": POSITIVE,
        "dtype": STRING,
        "quantization": QUANTIZATION,
        "inputs": list_of(STRING),
        "outputs": list_of(STRING),
        "source": optional(STRING),
        "source_info": optional(OBJECT),
        "kind": optional(STRING),  # which kinds this ortspec runs is checked with the model, for a clearer message
        "training": optional(OBJECT),
        "long_rope_after": optional(nullable(POSITIVE)),  # Phi-3 longrope: positions before the long factors
        "kv_dtype": optional(one_of(*KV_DTYPES)),  # the KV cache's element type (absent: dtype's)
    }
)
TOKENIZER = record(
    {
        "files": list_of(FILE),
        "eos_token_ids": list_of(TOKEN_ID),
        "bos_token_id": optional(nullable(TOKEN_ID)),
        "pad_token_id": optional(nullable(TOKEN_ID)),
        "chat_template": optional(nullable(STRING)),
    }
)
MANIFEST = record(
    {
        "format": STRING,
        "format_version": integer(1),
        "ortspec_version": STRING,
        "target": MODEL,
        "tokenizer": TOKENIZER,
        "draft": optional(nullable(MODEL)),
        "generation": optional(OBJECT),
        "compatibility": optional(record({"shared_vocab_size": optional(POSITIVE)})),
    }
)

_JSON_TYPES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
}


def _shown(value: Any) -> str:
    """`a string ("8")`: the JSON type and a short excerpt of a value."""
    text = json.dumps(value)
    return f"{_JSON_TYPES.get(type(value), 'null')} ({text if len(text) <= 40 else text[:37] + '...'})"


def problem(value: Any, rule: Rule = MANIFEST, path: str = "", document: str = "manifest") -> str | None:
    """The first way `value` breaks `rule`, as a sentence naming the field of `document`; None if it does not."""
    if not rule.accepts(value):
        return f"{document} field {path or '(top level)'} must be {rule.expected}, got {_shown(value)}"
    if rule.fields and value is not None:
        for name, sub in rule.fields.items():
            where = f"{path}.{name}" if path else name
            if name not in value:
                if sub.required:
                    return f"{document} field {where} is missing"
            elif found := problem(value[name], sub, where, document):
                return found
    if rule.items and value is not None:
        for i, item in enumerate(value):
            if found := problem(item, rule.items, f"{path}[{i}]", document):
                return found
    return None
