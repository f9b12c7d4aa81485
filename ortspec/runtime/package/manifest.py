"""The deployment package's manifest: the contract between export and runtime.

The exporter writes here what the package holds, and the runtime trusts nothing it does not check:
loading checks every field against the schema (schema.py), refuses paths that escape the
package, and checks that every file the runtime will open (graphs, their external data, tokenizer
files) is listed, a regular file of the listed size and, when verifying, of the listed sha256. Each
graph's real inputs, outputs and shapes are checked against its entry when its session is made
(decoder.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ortspec.runtime.errors import PackageError
from ortspec.runtime.package import schema
from ortspec.runtime.package.external_data import external_data_locations, initializer_dims
from ortspec.runtime.package.json_file import read_json

FORMAT_NAME = "ortspec-package"
FORMAT_VERSION = 2  # 2: a draft may be a feature-level head (kind "eagle-head")
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
HEAD_KIND = "eagle-head"
MODEL_KINDS = ("causal-lm", HEAD_KIND)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # special token strings; optional
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB (a chat template at most adds some)


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
    exporter: str  # "optimum" or "builder", for humans: the runtime reads the graph
    onnx: str  # path of the graph, relative to the package root
    files: list[FileEntry]
    kv_layout: str  # "concat" or "shared-buffer" (graph_names.kv_layout); checked against the graph
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
    kv_dtype: str | None = None  # the KV cache's element type (numpy's name); None in older packages

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

    def tokenizer_file(self, name: str) -> Path | None:
        """The path of the tokenizer file called `name` (e.g. tokenizer.json), None if none is listed."""
        entry = next((f for f in self.tokenizer.files if PurePosixPath(f.path).name == name), None)
        return None if entry is None else resolve_inside(self.root, entry.path)

    def tokenizer_json(self) -> Path:
        """The path of tokenizer.json, which every package must list."""
        path = self.tokenizer_file(TOKENIZER_FILE)
        if path is None:
            raise PackageError(f"manifest field tokenizer.files lists no {TOKENIZER_FILE}; the package is malformed")
        return path

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
    """`root / relative`, refusing absolute paths and anything that resolves (through `..` or a symlink)
    outside `root`."""
    if not relative or Path(relative).is_absolute() or "\\" in relative:
        raise PackageError(f"manifest path {relative!r} is not a relative package path; the package is malformed")
    full = (root / relative).resolve()
    if not full.is_relative_to(root.resolve()):
        how = "" if os.path.normpath(relative).startswith("..") else " through a symlink"
        raise PackageError(
            f"manifest path {relative!r} points outside the package directory {root}{how}; refusing to load it"
        )
    return full


def _listed(root: Path, files: list[FileEntry], relative: str) -> bool:
    """Whether `relative` is one of `files` (compared as the paths they resolve to)."""
    full = resolve_inside(root, relative)
    return any(resolve_inside(root, f.path) == full for f in files)


def _model(data: dict[str, Any], role: str) -> ModelSpec:
    spec = ModelSpec(**{**_known(ModelSpec, data), "files": _files(data["files"])})
    if spec.role != role:
        raise PackageError(f"manifest field {role}.role is {spec.role!r}, not {role!r}; the package is malformed")
    if spec.kind not in MODEL_KINDS:
        raise PackageError(
            f"the {role} is of kind {spec.kind!r}, which this ortspec cannot run (it runs {', '.join(MODEL_KINDS)}); "
            "upgrade ortspec"
        )
    if spec.kind == HEAD_KIND and role != "draft":
        raise PackageError(f"the {role} is a draft head; only a draft can be one")
    return spec


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of `data` that `cls` has (the schema has checked them)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _files(data: list[dict[str, Any]]) -> list[FileEntry]:
    return [FileEntry(**_known(FileEntry, f)) for f in data]


def parse_manifest(data: dict[str, Any], root: Path) -> Manifest:
    """Check format, version and every field's type, then build the typed manifest."""
    if data.get("format") != FORMAT_NAME:
        raise PackageError(f"{root} is not an ortspec package (manifest format is {data.get('format')!r})")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise PackageError(
            f"package format version {version!r} is not supported by this ortspec (it reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade ortspec or re-export the package with this version"
        )
    if found := schema.problem(data):
        raise PackageError(f"{found}; the package is malformed")
    tokenizer = data["tokenizer"]
    return Manifest(
        format=data["format"],
        format_version=version,
        ortspec_version=data["ortspec_version"],
        target=_model(data["target"], "target"),
        tokenizer=TokenizerSpec(**{**_known(TokenizerSpec, tokenizer), "files": _files(tokenizer["files"])}),
        draft=_model(data["draft"], "draft") if data.get("draft") is not None else None,
        generation=data.get("generation", {}),
        compatibility=data.get("compatibility", {}),
        root=root,
    )


def check_listing(manifest: Manifest) -> None:
    """Refuse a graph or tokenizer the manifest names but does not list among its checked files."""
    root = manifest.root
    for model in manifest.models():
        if not _listed(root, model.files, model.onnx):
            raise PackageError(
                f"manifest field {model.role}.onnx names {model.onnx}, which {model.role}.files does not list; "
                "refusing to load it"
            )
    manifest.tokenizer_json()  # refuses a package that lists none


def verify_files(manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse missing, non-regular, truncated or altered files, naming the file and what to do.

    Sizes come from the file system, so a file that is not what the manifest says is refused
    before anything reads it.
    """
    for entry in manifest.all_files():
        path = resolve_inside(manifest.root, entry.path)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise PackageError(f"package file {entry.path} is missing; re-export the package") from None
        if stat.S_ISDIR(info.st_mode):
            raise PackageError(f"package file {entry.path} is a directory, not a file; the package is malformed")
        if not stat.S_ISREG(info.st_mode):
            raise PackageError(
                f"package file {entry.path} is not a regular file (a device, pipe or socket); refusing to read it"
            )
        if info.st_size != entry.size:
            raise PackageError(
                f"package file {entry.path} has {info.st_size} bytes, the manifest says {entry.size}: it is "
                "truncated or altered; re-export or re-copy the package"
            )
        if check_hashes and sha256_of(path) != entry.sha256:
            raise PackageError(
                f"package file {entry.path} fails its sha256 check: it is corrupted or altered; "
                "re-export or re-copy the package"
            )


def check_external_data(manifest: Manifest) -> None:
    """Refuse a graph that would make ONNX Runtime read a file its model's `files` do not list."""
    for model in manifest.models():
        graph = resolve_inside(manifest.root, model.onnx)
        try:
            locations = external_data_locations(graph)
        except ValueError as exc:
            raise PackageError(
                f"package file {model.onnx} is not an ONNX graph ({exc}); re-export the package"
            ) from exc
        for location in sorted(locations):
            relative = (PurePosixPath(model.onnx).parent / location).as_posix()
            try:
                listed = not Path(location).is_absolute() and _listed(manifest.root, model.files, relative)
            except PackageError:  # it leaves the package
                listed = False
            if not listed:
                raise PackageError(
                    f"package file {model.onnx} reads external data from {location!r}, which {model.role}.files "
                    "does not list; refusing to load it"
                )


ROTARY_TABLES = {"cos_cache": 1, "cos_cache_local": 1, "cos_tables": 2}  # name -> tables stacked (longrope: 2)


def check_rotary_tables(manifest: Manifest) -> None:
    """Refuse a `max_positions` beyond the rotary tables a graph holds (GroupQueryAttention's cos_cache): ONNX
    Runtime would fail at the first sequence that long. Graphs that compute their rotary angles have none."""
    for model in manifest.models():
        graph = resolve_inside(manifest.root, model.onnx)
        for name, dims in initializer_dims(graph, ROTARY_TABLES).items():
            rows = dims[0] // ROTARY_TABLES[name] if dims else 0
            if model.max_positions > rows:
                raise PackageError(
                    f"manifest field {model.role}.max_positions is {model.max_positions}, but the {model.role} "
                    f"graph's rotary table {name} holds {rows} positions; the package is malformed"
                )


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise PackageError(f"package directory {root} does not exist")
    path = root / MANIFEST_FILE
    if not path.exists():
        raise PackageError(f"{root} has no {MANIFEST_FILE}: not an ortspec package (create one with `ortspec export`)")
    resolve_inside(root, MANIFEST_FILE)
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{path} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes; refusing to read it")
    data = read_json(path, PackageError, MAX_MANIFEST_BYTES)
    if not isinstance(data, dict):
        raise PackageError(f"{path} does not hold a JSON object; the package is corrupted")
    return data


def load_manifest(package: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a package directory: the manifest's fields, that every file the runtime will
    open (graphs, their external data, tokenizer files) is listed, inside the package, a regular file
    of the listed size, and (by default) has the listed sha256."""
    root = Path(package)
    manifest = parse_manifest(_read_manifest(root), root)
    check_listing(manifest)
    verify_files(manifest, check_hashes=verify)
    check_external_data(manifest)
    check_rotary_tables(manifest)
    return manifest
