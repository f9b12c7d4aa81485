"""Shared fixtures: tiny random checkpoints and the packages exported from them (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ortspec.models.random import make_checkpoint, perturbed_copy

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """checkpoint(family, kind) -> directory. kind: target | same (copy) | close (perturbed) | other."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str = "llama", kind: str = "target") -> Path:
        key = (family, kind)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}-{kind}")
            if kind == "target":
                made[key] = make_checkpoint(root, family, seed=0)
            elif kind == "same":
                made[key] = perturbed_copy(get(family), root, noise=0.0)
            elif kind == "close":
                made[key] = perturbed_copy(get(family), root, noise=0.05)
            elif kind == "other":
                made[key] = make_checkpoint(root, family, seed=7, layers=1)
            else:
                raise ValueError(kind)
        return made[key]

    return get


@pytest.fixture(scope="session")
def package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """package(family, draft_kind or None, quantize) -> exported package directory."""
    from ortspec.export import export_pair

    made: dict[tuple[str, str | None, str], Path] = {}

    def get(family: str = "llama", draft: str | None = "close", quantize: str = "none") -> Path:
        key = (family, draft, quantize)
        if key not in made:
            out = tmp_path_factory.mktemp("pkg") / f"{family}-{draft}-{quantize}"
            export_pair(
                checkpoint(family),
                out,
                draft=checkpoint(family, draft) if draft else None,
                quantize=quantize,
                report=lambda _: None,
            )
            made[key] = out
        return made[key]

    return get
