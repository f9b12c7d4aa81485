"""Generation options, declared once: each `GenerationConfig` field carries its type, bounds and help.

The API validates options with `check_option`, and the CLI builds its flags from the same fields and
calls the same check, so both accept the same values and say the same thing about the others.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import Field, dataclass, field, fields
from enum import Enum
from typing import Any


class DrafterKind(str, Enum):
    """Who drafts in a generation. Compares equal to its name, so options and stats carry plain strings."""

    MODEL = "model"  # the package's draft LM (asked for as "model"; a head package resolves it to HEAD)
    HEAD = "head"  # the package's feature-level draft head
    HYBRID = "hybrid"  # suffix matches where they are worth more than the draft model's guess, else the model
    NGRAM = "ngram"  # prompt lookup
    SUFFIX = "suffix"  # suffix matches in the prompt, the output so far and earlier outputs
    NONE = "none"  # plain decoding

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # as its name: messages that list kinds ("got 'head'") read as plain strings
        return repr(self.value)

    @property
    def calls_a_model(self) -> bool:
        """Drafting costs model calls (a draft LM, or a head)."""
        return self in (DrafterKind.MODEL, DrafterKind.HEAD)

    @property
    def needs_draft_state(self) -> bool:
        """Drafting decodes with the package's draft model (the hybrid: in some rounds)."""
        return self in (DrafterKind.MODEL, DrafterKind.HEAD, DrafterKind.HYBRID)

    @property
    def scores_tokens(self) -> bool:
        """A free drafter that gives each token its chance of acceptance: auto γ sends the best prefix."""
        return self is DrafterKind.SUFFIX


DRAFTERS = tuple(k.value for k in (DrafterKind.MODEL, DrafterKind.HYBRID, DrafterKind.NGRAM, DrafterKind.SUFFIX))
GAMMA_POLICIES = ("adaptive", "auto")


def default_drafter(has_draft_model: bool) -> DrafterKind:
    """The drafter when none is asked for: the hybrid where the package has a draft model, else suffix matches."""
    return DrafterKind.HYBRID if has_draft_model else DrafterKind.SUFFIX


@dataclass(frozen=True)
class Spec:
    """How one option is checked and shown. kind: int, float, bool, choice, gamma (a positive integer or
    a policy name) or strings (a string or a list of them). Bounds apply to int and float options."""

    help: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is allowed (and means the documented default behaviour)
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the CLI spelling when not --field-name (a bool's flag sets `not default`)

    def bounds(self) -> str:
        """The allowed range in words, for messages and help ("" when unbounded)."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {self.high:g}"
        return ""


def option(default: Any, help: str, kind: str, **spec: Any) -> Any:
    """A GenerationConfig field: its default and its Spec."""
    return field(default=default, metadata={"spec": Spec(help, kind, **spec)})


@dataclass(frozen=True)
class GenerationConfig:
    """Everything `generate`, `stream` and `chat` accept besides the prompt; see each field's help."""

    max_new_tokens: int = option(128, "Most new tokens to generate.", "int", low=1)
    use_draft: bool = option(True, "Plain decoding with the target alone (use_draft=False).", "bool", flag="--no-draft")
    draft: str | None = option(
        None,
        "Who drafts: suffix matches where they are worth more than the package's draft model, the model "
        "elsewhere (hybrid; default when the package has a draft model), the draft model alone (model), suffix "
        "matches in the prompt, the output so far and this session's earlier outputs (suffix; default without "
        "a draft model), or prompt lookup (ngram).",
        "choice",
        choices=DRAFTERS,
        optional=True,
    )
    draft_tokens: int | str = option(
        "auto",
        "γ, tokens drafted per target call: 'auto' picks each round the γ with the best predicted throughput "
        "from this machine's measured step costs (`ortspec calibrate`, run on first use) and the running acceptance "
        "rate, and decodes plainly when no γ is predicted to gain 5%; a number fixes γ; 'adaptive' is +2 after a "
        "fully accepted round, -1 otherwise.",
        "gamma",
        low=1,
        choices=GAMMA_POLICIES,
    )
    draft_tokens_max: int = option(8, "Upper bound for auto and adaptive γ.", "int", low=1)
    draft_min_prob: float = option(
        0.0,
        "End a round early when the draft's top probability falls below this (like llama.cpp's p-min).",
        "float",
        low=0,
        high=1,
        high_open=True,
    )
    max_ngram_size: int = option(3, "Prompt lookup: the longest suffix n-gram searched for.", "int", low=1)
    temperature: float = option(
        0.0,
        "0 is greedy; above 0 samples (speculative sampling keeps the target's distribution exactly).",
        "float",
        low=0,
    )
    top_k: int = option(0, "Keep the k most likely tokens (0: off).", "int", low=0)
    top_p: float = option(1.0, "Nucleus sampling mass (1: off).", "float", low=0, high=1, low_open=True)
    min_p: float = option(
        0.0, "Drop tokens below min-p x the top probability (0: off).", "float", low=0, high=1, high_open=True
    )
    repetition_penalty: float = option(
        1.0, "Penalise tokens already in the sequence (1: off).", "float", low=0, low_open=True
    )
    seed: int | None = option(
        None, "Random seed: the same seed gives the same sampled output.", "int", low=0, optional=True
    )
    stop: tuple[str, ...] = option(
        (), "Stop string (repeatable; escapes like \\n work); the text ends before it.", "strings"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_option(f.name, getattr(self, f.name)))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GenerationConfig:
        """The config of keyword options, naming an unknown one (instead of a TypeError)."""
        unknown = sorted(set(options) - OPTIONS.keys())
        if unknown:
            raise ValueError(f"unknown generation option {unknown[0]!r}; options: {', '.join(OPTIONS)}")
        return cls(**options)


OPTIONS: dict[str, Field[Any]] = {f.name: f for f in fields(GenerationConfig)}


def spec_of(name: str) -> Spec:
    spec: Spec = OPTIONS[name].metadata["spec"]
    return spec


def check_option(name: str, value: Any) -> Any:
    """`value` checked against option `name`'s spec, in its canonical type (a ValueError names the option)."""
    spec = spec_of(name)
    if value is None and spec.optional:
        return None
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    if spec.kind == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if spec.kind == "strings":
        return _strings(name, value)
    if spec.kind == "gamma":
        if isinstance(value, str) and value in spec.choices:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            policies = " or ".join(repr(c) for c in spec.choices)
            raise ValueError(f"{name} must be a positive integer, {policies}, got {value!r}")
    if spec.kind in ("int", "gamma"):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    else:  # float
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    low_ok = spec.low is None or (value > spec.low if spec.low_open else value >= spec.low)
    high_ok = spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be {spec.bounds()}, got {value}")
    return value


def _strings(name: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{name} must be a string or a list of strings, got {item!r} in it")
        check_text(name, item)
    return tuple(items)


def check_text(what: str, text: str) -> str:
    """`text`, if it is valid Unicode (a lone surrogate, e.g. from undecodable bytes, cannot be tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode text: it holds the lone surrogate {text[exc.start]!r} at "
            f"character {exc.start} (bytes that are not UTF-8?)"
        ) from None
    return text


THREADS_PER_CPU = 4  # more threads (or processes) than this per CPU only contend


def check_threads(name: str, value: int | None) -> int | None:
    """A count of threads or processes (None: the default), at most THREADS_PER_CPU per CPU of this machine."""
    limit = THREADS_PER_CPU * (os.cpu_count() or 1)
    if value is not None and (type(value) is not int or not 1 <= value <= limit):
        raise ValueError(f"{name} must be 1 .. {limit} ({THREADS_PER_CPU} per CPU of this machine), got {value!r}")
    return value


def check_paths(**paths: Any) -> None:
    """Refuse a path holding a NUL byte, which no file name can, naming its option (os calls would only say
    "embedded null byte"). None values and non-paths (hub ids are strings too) pass."""
    for name, value in paths.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, os.PathLike)) and "\0" in str(os.fspath(item)):
                raise ValueError(f"{name} {str(item)!r} holds a NUL byte, which no file name can")
