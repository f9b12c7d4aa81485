"""The deployment package's manifest: the contract between export and runtime.

Everything the runtime needs is written here by the exporter, so nothing is guessed from graph
names at load time. Loading validates the format, refuses paths that escape the package and checks
every file's size and sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "ortspec-package"
FORMAT_VERSION = 2  # 2: a draft may be a feature-level head (kind "eagle-head")
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
HEAD_KIND = "eagle-head"
MODEL_KINDS = ("causal-lm", HEAD_KIND)


class PackageError(Exception):
    """A deployment package is missing, malformed, corrupted or unsupported."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the package, relative to its root, with the size and hash it was written with."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime must know about one ONNX causal LM of the package."""

    role: str  # "target" or "draft"
    family: str  # model_type of the checkpoint: llama, qwen2, gpt2, ...
    exporter: str  # "optimum" (later: "builder")
    onnx: str  # path of the graph, relative to the package root
    files: list[FileEntry]
    kv_layout: str  # "concat" or "shared-buffer"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # rows of the logits (may exceed the tokenizer by padding rows)
    max_positions: int
    dtype: str
    quantization: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    source: str = ""  # the checkpoint it came from (path or hub id), for humans
    source_info: dict[str, Any] = field(default_factory=dict)  # e.g. a GGUF source: format, tensor types
    kind: str = "causal-lm"  # or "eagle-head": a draft that continues the target's features
    training: dict[str, Any] = field(default_factory=dict)  # how a distilled draft was made, for humans
    # longrope (Phi-3): longer sequences rotate with other factors, so crossing this length recomputes the cache
    long_rope_after: int | None = None

    @property
    def is_head(self) -> bool:
        return self.kind == HEAD_KIND


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer files and the special ids generation needs."""

    files: list[FileEntry]
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; `root` is the package directory it was read from."""

    format: str
    format_version: int
    ortspec_version: str
    target: ModelSpec
    tokenizer: TokenizerSpec
    draft: ModelSpec | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    compatibility: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")

    def models(self) -> list[ModelSpec]:
        """The target, then the draft if the package has one."""
        return [self.target] + ([self.draft] if self.draft else [])

    def all_files(self) -> list[FileEntry]:
        """Every checksummed file of the package."""
        return [f for m in self.models() for f in m.files] + list(self.tokenizer.files)

    def to_json(self) -> str:
        """Serialise (without `root`, which is where the package happens to lie)."""
        data = dataclasses.asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    """Describe `path` (inside `root`) for the manifest."""
    return FileEntry(path.relative_to(root).as_posix(), path.stat().st_size, sha256_of(path))


def resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths and anything that resolves outside `root`."""
    if not relative or Path(relative).is_absolute() or "\\" in relative:
        raise PackageError(f"manifest path {relative!r} is not a relative package path; the package is malformed")
    full = (root / relative).resolve()
    if not full.is_relative_to(root.resolve()):
        raise PackageError(
            f"manifest path {relative!r} points outside the package directory {root}; refusing to load it"
        )
    return full


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Construct a dataclass from a dict, naming the missing field if there is one."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - data.keys())
    if missing:
        raise PackageError(f"manifest {where} lacks {', '.join(missing)}; the package is malformed")
    return cls(**{k: v for k, v in data.items() if k in names})


def _files(data: list[dict[str, Any]], where: str) -> list[FileEntry]:
    return [_build(FileEntry, f, f"{where} file entry") for f in data]


def _model(data: dict[str, Any] | None, role: str) -> ModelSpec | None:
    if data is None:
        return None
    spec = _build(ModelSpec, data, role)
    if spec.kind not in MODEL_KINDS:
        raise PackageError(
            f"the {role} is of kind {spec.kind!r}, which this ortspec cannot run (it runs {', '.join(MODEL_KINDS)}); "
            "upgrade ortspec"
        )
    if spec.kind == HEAD_KIND and role != "draft":
        raise PackageError(f"the {role} is a draft head; only a draft can be one")
    return dataclasses.replace(spec, files=_files(spec.files, role))


def parse_manifest(data: dict[str, Any], root: Path) -> Manifest:
    """Check format and version, then build the typed manifest."""
    if data.get("format") != FORMAT_NAME:
        raise PackageError(f"{root} is not an ortspec package (manifest format is {data.get('format')!r})")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PackageError(
            f"package format version {version!r} is not supported by this ortspec (it reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade ortspec or re-export the package with this version"
        )
    if "target" not in data or "tokenizer" not in data:
        raise PackageError("manifest lacks the target model or the tokenizer; the package is malformed")
    tokenizer = _build(TokenizerSpec, data["tokenizer"], "tokenizer")
    manifest = _build(Manifest, {**data, "root": root}, "top level")
    return dataclasses.replace(
        manifest,
        target=_model(data["target"], "target"),
        draft=_model(data.get("draft"), "draft"),
        tokenizer=dataclasses.replace(tokenizer, files=_files(tokenizer.files, "tokenizer")),
    )


def verify_files(manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse missing, truncated or altered files, naming the file and what to do."""
    for entry in manifest.all_files():
        path = resolve_inside(manifest.root, entry.path)
        if not path.is_file():
            raise PackageError(f"package file {entry.path} is missing; re-export the package")
        size = path.stat().st_size
        if size != entry.size:
            raise PackageError(
                f"package file {entry.path} has {size} bytes, the manifest says {entry.size}: it is "
                "truncated or altered; re-export or re-copy the package"
            )
        if check_hashes and sha256_of(path) != entry.sha256:
            raise PackageError(
                f"package file {entry.path} fails its sha256 check: it is corrupted or altered; "
                "re-export or re-copy the package"
            )


def load_manifest(package: str | Path, verify: bool = True) -> Manifest:
    """Read, validate and (by default) checksum a package directory."""
    root = Path(package)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise PackageError(f"package directory {root} does not exist")
    if not path.is_file():
        raise PackageError(f"{root} has no {MANIFEST_FILE}: not an ortspec package (create one with `ortspec export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); the package is corrupted") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path} does not hold a JSON object; the package is corrupted")
    manifest = parse_manifest(data, root)
    for entry in manifest.all_files():
        resolve_inside(root, entry.path)
    for model in manifest.models():
        resolve_inside(root, model.onnx)
    verify_files(manifest, check_hashes=verify)
    return manifest
