"""Shared fixtures: tiny random checkpoints and the packages exported from them (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ortspec.models.random import make_checkpoint, perturbed_copy

from helpers.cases import FAMILY_SHAPES, VARIANTS


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """checkpoint(family, kind, variant) -> directory. kind: target | same (copy) | close (perturbed) | other."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(family: str = "llama", kind: str = "target", variant: str = "") -> Path:
        key = (family, kind, variant)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}-{kind}-{variant or 'base'}")
            shape = {**FAMILY_SHAPES.get(family, {}), **VARIANTS[variant]}
            if kind == "target":
                made[key] = make_checkpoint(root, family, seed=0, **shape)
            elif kind == "same":
                made[key] = perturbed_copy(get(family, variant=variant), root, noise=0.0)
            elif kind == "close":
                made[key] = perturbed_copy(get(family, variant=variant), root, noise=0.05)
            elif kind == "other":
                made[key] = make_checkpoint(root, family, seed=7, layers=1, **shape)
            else:
                raise ValueError(kind)
        return made[key]

    return get


@pytest.fixture(scope="session")
def package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """package(family, draft kind or None, quantize, exporter, draft_exporter, variant, kv_dtype) -> package
    directory."""
    from ortspec.export import export_pair

    made: dict[tuple, Path] = {}

    def get(
        family: str = "llama",
        draft: str | None = "close",
        quantize: str = "none",
        exporter: str = "auto",
        draft_exporter: str | None = None,
        variant: str = "",
        kv_dtype: str | None = None,
    ) -> Path:
        key = (family, draft, quantize, exporter, draft_exporter, variant, kv_dtype)
        if key not in made:
            out = tmp_path_factory.mktemp("pkg") / "-".join(str(k) for k in key)
            export_pair(
                checkpoint(family, variant=variant),
                out,
                draft=checkpoint(family, draft, variant) if draft else None,
                quantize=quantize,
                exporter=exporter,
                draft_exporter=draft_exporter,
                kv_dtype=kv_dtype,
                report=lambda _: None,
            )
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def chat_package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama pair (draft "close") with a chat template in its tokenizer: the server's tests."""
    import json
    import shutil

    from ortspec.export import export_pair

    root = tmp_path_factory.mktemp("chat-pkg")
    source = root / "checkpoint"
    shutil.copytree(checkpoint("llama"), source)
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    export_pair(source, root / "tiny-chat", draft=checkpoint("llama", "close"), quantize="none", report=lambda _: None)
    return root / "tiny-chat"


@pytest.fixture(scope="session")
def llama_head_package(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 llama target with a distilled-shape draft head (final features only), exported once."""
    from ortspec.export.pair import export_pair

    from helpers.heads import make_head

    root = tmp_path_factory.mktemp("llama-head")
    head = make_head(checkpoint("llama"), root / "head")
    export_pair(checkpoint("llama"), root / "pkg", draft=head, quantize="none", report=lambda _: None)
    return root / "pkg"
