"""Resolve a local checkpoint directory, a GGUF file or a Hugging Face Hub id; read its configs and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortspec.runtime.package.json_file import read_json

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found, downloaded or read."""


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face causal LM checkpoint on disk, or a GGUF file read as one."""

    name: str  # as the user gave it
    path: Path  # the checkpoint directory, or the .gguf file
    config: dict[str, Any]
    generation_config: dict[str, Any]
    source_info: dict[str, Any] = field(default_factory=dict)  # for GGUF: format, architecture, tensor types

    @property
    def is_gguf(self) -> bool:
        return self.source_info.get("format") == "gguf"

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def eos_token_ids(self) -> list[int]:
        """Every eos id: generation_config.json first, then config.json."""
        for source in (self.generation_config, self.config):
            eos = source.get("eos_token_id")
            if eos is not None:
                return sorted(set(eos if isinstance(eos, list) else [eos]))
        return []

    def special_id(self, name: str) -> int | None:
        """bos/pad token id from the generation config or config (first of a list)."""
        for source in (self.generation_config, self.config):
            value = source.get(f"{name}_token_id")
            if value is not None:
                return value[0] if isinstance(value, list) else int(value)
        return None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _download(name: str) -> Path:
    """Fetch a hub checkpoint (config, safetensors, tokenizer) or say clearly why not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except HFValidationError as exc:
        raise CheckpointError(f"{name!r} is neither a local checkpoint directory nor a valid hub id") from exc
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"model {name!r} is not available locally and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}); check the name, your network, or pass a local checkpoint directory"
        ) from exc


def _gguf_checkpoint(text: str, path: Path) -> Checkpoint:
    """A GGUF file as a checkpoint: config and generation config from its metadata (no torch needed)."""
    from .builder.gguf_io import GGUFError, open_gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file {text} does not exist")
    try:
        model = open_gguf(path)
        config = model.config()
    except GGUFError as exc:
        raise CheckpointError(str(exc)) from exc
    return Checkpoint(text, path, config, model.generation_config(), model.source_info())


def resolve_checkpoint(name: str | Path) -> Checkpoint:
    """A local directory with config.json, a local .gguf file, or a hub id downloaded into the Hugging Face cache."""
    text = str(name)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        return _gguf_checkpoint(text, path)
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {text} does not exist")
    else:
        path = _download(text)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to export a GGUF, pass the file itself (e.g. {ggufs[0]})" if ggufs else ""
        raise CheckpointError(f"{text} has no config.json: not a Hugging Face model checkpoint{hint}")
    return Checkpoint(text, path, _read_json(path / "config.json"), _read_json(path / "generation_config.json"))


def prepare_tokenizer(checkpoint: Checkpoint, out_dir: Path) -> Path:
    """A directory holding the checkpoint's tokenizer.json (converted by transformers if it has none;
    rebuilt from the metadata, without transformers, for a GGUF file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint.is_gguf:
        from .builder.gguf_io import GGUFError, open_gguf
        from .gguf_tokenizer import write_gguf_tokenizer

        try:
            return write_gguf_tokenizer(open_gguf(checkpoint.path), out_dir)
        except GGUFError as exc:
            raise CheckpointError(str(exc)) from exc
    if (checkpoint.path / "tokenizer.json").is_file():
        for file in TOKENIZER_FILES:
            if (checkpoint.path / file).is_file():
                (out_dir / file).write_bytes((checkpoint.path / file).read_bytes())
        return out_dir
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, use_fast=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer of {checkpoint.name}: {exc}") from exc
    if not tokenizer.is_fast:
        raise CheckpointError(f"the tokenizer of {checkpoint.name} has no fast (tokenizer.json) form")
    tokenizer.save_pretrained(out_dir)
    return out_dir
