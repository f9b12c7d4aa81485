"""The package format: what export writes, and the clear errors the runtime gives for bad packages."""

from __future__ import annotations

import dataclasses
import json
import shutil

import onnx
import pytest

import ortspec
from ortspec.export.package import describe_model
from ortspec.runtime.package import schema as manifest_schema
from ortspec.runtime.package.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    ModelSpec,
    PackageError,
    TokenizerSpec,
    file_entry,
    load_manifest,
    sha256_of,
)
from ortspec.runtime.text import tokenizer as tokenizer_module


@pytest.fixture
def copy_of(package, tmp_path):
    def make(**kwargs):
        dst = tmp_path / "copy"
        shutil.copytree(package(**kwargs), dst)
        return dst

    return make


def edit_manifest(root, change):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_describes_every_file(package):
    root = package("llama", draft="close", quantize="int4")
    manifest = load_manifest(root)
    assert manifest.format_version == FORMAT_VERSION
    assert {f.path for f in manifest.all_files()} >= {
        "target/model.onnx",
        "draft/model.onnx",
        "tokenizer/tokenizer.json",
    }
    for entry in manifest.all_files():
        assert (root / entry.path).stat().st_size == entry.size
        assert sha256_of(root / entry.path) == entry.sha256
    target = manifest.target
    assert (target.family, target.kv_layout, target.num_layers, target.num_kv_heads, target.head_dim) == (
        "llama",
        "shared-buffer",
        2,
        2,
        16,
    )
    assert target.quantization["bits"] == 4 and target.quantization["block_size"] == 32
    assert target.quantization["accuracy_level"] == 4
    assert manifest.tokenizer.eos_token_ids == [0]
    assert manifest.compatibility["shared_vocab_size"] == target.vocab_size
    assert not any(p.name.startswith(".") for p in root.parent.iterdir()), "export left staging directories behind"


def test_corrupted_model_file_is_refused(copy_of):
    root = copy_of(family="llama", draft=None)
    model = root / "target" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"target/model.onnx fails its sha256 check"):
        ortspec.load(root)
    model.write_bytes(bytes(data[:-10]))
    with pytest.raises(PackageError, match=r"target/model.onnx has \d+ bytes"):
        ortspec.load(root, verify=False)


@pytest.mark.parametrize("evil", ["../outside.onnx", "/etc/passwd", "target/../../outside.onnx"])
def test_paths_escaping_the_package_are_refused(copy_of, evil):
    root = copy_of(family="llama", draft=None)
    (root.parent / "outside.onnx").write_bytes((root / "target" / "model.onnx").read_bytes())
    edit_manifest(root, lambda m: m["target"].update(onnx=evil))
    with pytest.raises(PackageError, match=r"outside the package|not a relative package path"):
        ortspec.load(root)


def test_unknown_format_version_is_refused(copy_of):
    root = copy_of(family="llama", draft=None)
    edit_manifest(root, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(PackageError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        ortspec.load(root)


def test_version_1_packages_still_load_and_unknown_model_kinds_are_refused(copy_of):
    root = copy_of(family="llama", draft=None)
    edit_manifest(root, lambda m: m.update(format_version=1))
    assert ortspec.load(root).manifest.format_version == 1
    edit_manifest(root, lambda m: m["target"].update(kind="mixture-of-drafts"))
    with pytest.raises(PackageError, match=r"kind 'mixture-of-drafts'.*upgrade ortspec"):
        ortspec.load(root)
    edit_manifest(root, lambda m: m["target"].update(kind="eagle-head"))
    with pytest.raises(PackageError, match="only a draft can be one"):
        ortspec.load(root)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match=r"no manifest\.json"):
        ortspec.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        ortspec.load(tmp_path)


def test_prompt_longer_than_the_context(package):
    pipe = ortspec.load(package("llama", draft="close"))
    limit = pipe.target.max_length
    with pytest.raises(ortspec.ContextLengthError, match=f"context of {limit} positions"):
        pipe.generate([5] * (limit - 3), max_new_tokens=10)
    assert len(pipe.generate([5] * (limit - 3), max_new_tokens=3).token_ids) == 3


def test_bad_prompts(package):
    pipe = ortspec.load(package("llama", draft="close"))
    with pytest.raises(ValueError, match="empty"):
        pipe.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pipe.generate([10**6], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate([5], max_new_tokens=0)


def set_field(manifest, dotted, value):
    """Set `a.b[0].c` in a manifest dict."""
    *parents, last = dotted.replace("[", ".").replace("]", "").split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("target", [1], "field target must be an object, got a list"),
        ("target.files", "x", "field target.files must be a list, got a string"),
        ("target.num_layers", "8", r"field target.num_layers must be an integer >= 1, got a string \(\"8\"\)"),
        ("target.num_kv_heads", True, "field target.num_kv_heads must be an integer >= 1, got a boolean"),
        ("target.files[0].size", "8889704", r"field target.files\[0\].size must be an integer >= 0, got a string"),
        ("target.files[0].sha256", None, r"field target.files\[0\].sha256 must be 64 lowercase hex digits, got null"),
        ("target.kv_layout", "paged", "field target.kv_layout must be one of 'concat', 'shared-buffer'"),
        ("target.kv_dtype", "int8", "field target.kv_dtype must be one of 'float32', 'float16', got a string"),
        ("target.role", "draft", "field target.role is 'draft', not 'target'"),
        ("tokenizer.eos_token_ids", ["2"], r"field tokenizer.eos_token_ids\[0\] must be an integer >= 0"),
        ("tokenizer.chat_template", 7, "field tokenizer.chat_template must be a string or null"),
        ("draft", 5, "field draft must be an object or null, got an integer"),
        ("compatibility", {"shared_vocab_size": "384"}, "field compatibility.shared_vocab_size must be an integer"),
    ],
)
def test_wrong_manifest_types_are_refused_naming_the_field(copy_of, version, field, value, message):
    root = copy_of(family="llama", draft=None)
    edit_manifest(root, lambda m: (m.update(format_version=version), set_field(m, field, value)))
    with pytest.raises(PackageError, match=f"manifest {message}"):
        ortspec.load(root)


def test_missing_manifest_field_is_named(copy_of):
    root = copy_of(family="llama", draft=None)
    edit_manifest(root, lambda m: m["target"].pop("head_dim"))
    with pytest.raises(PackageError, match=r"manifest field target\.head_dim is missing"):
        ortspec.load(root)


def test_schema_covers_every_field_of_the_manifest_types():
    tables = [
        (manifest_schema.MANIFEST, Manifest, {"root"}),
        (manifest_schema.MODEL, ModelSpec, set()),
        (manifest_schema.TOKENIZER, TokenizerSpec, set()),
        (manifest_schema.FILE, FileEntry, set()),
    ]
    for rule, cls, not_stored in tables:
        assert set(rule.fields) == {f.name for f in dataclasses.fields(cls)} - not_stored, cls.__name__


def test_a_directory_listed_as_a_file_is_named_as_such(copy_of):
    root = copy_of(family="llama", draft=None)
    (root / "tokenizer" / "tokenizer_config.json").unlink()
    (root / "tokenizer" / "tokenizer_config.json").mkdir()
    with pytest.raises(PackageError, match=r"tokenizer/tokenizer_config\.json is a directory, not a file"):
        ortspec.load(root, verify=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_kv_heads", 3, "has 2 KV heads in past_key_values.0.key, target.num_kv_heads says 3"),
        ("head_dim", 8, "has a head dim of 16 in past_key_values.0.key, target.head_dim says 8"),
        ("vocab_size", 500, r"has logits of shape \[\S+, \S+, 384\], target.vocab_size says 500"),
        ("num_layers", 3, "has a cache of 2 layers, target.num_layers says 3"),
        ("kv_layout", "concat", "has the shared-buffer KV layout, target.kv_layout says concat"),
        ("dtype", "float16", r"has logits of type tensor\(float\), target.dtype says float16"),
        ("kv_dtype", "float16", r"has cache tensor past_key_values.0.key of type tensor\(float\), target.kv_dtype"),
        ("inputs", ["input_ids"], "has inputs (logits_to_keep, )?seqlens_k, .* that target.inputs does not list"),
        ("outputs", ["logits", "extra", "more"], "lacks outputs extra, more that target.outputs lists"),
    ],
)
def test_a_graph_that_disagrees_with_the_manifest_is_refused_at_load(copy_of, field, value, message):
    root = copy_of(family="llama", draft=None)
    if field == "outputs":
        edit_manifest(root, lambda m: m["target"]["outputs"].extend(value[1:]))
    else:
        edit_manifest(root, lambda m: m["target"].update({field: value}))
    with pytest.raises(PackageError, match=f"the target graph target/model.onnx {message}"):
        ortspec.load(root)


class MustNotRead:
    """Stands in for tokenizers.Tokenizer: loading must refuse before it reads any tokenizer file."""

    @staticmethod
    def from_file(path):
        raise AssertionError(f"{path} was read")


@pytest.mark.parametrize("listed", [True, False])
def test_a_tokenizer_symlinked_to_dev_zero_is_refused_without_reading_it(copy_of, monkeypatch, listed):
    monkeypatch.setattr(tokenizer_module, "Tokenizer", MustNotRead)
    root = copy_of(family="llama", draft=None)
    (root / "tokenizer" / "tokenizer.json").unlink()
    (root / "tokenizer" / "tokenizer.json").symlink_to("/dev/zero")
    if not listed:
        edit_manifest(root, lambda m: m["tokenizer"]["files"].remove(entry(m, "tokenizer/tokenizer.json")))
    message = "points outside the package directory .* through a symlink" if listed else "lists no tokenizer.json"
    for verify in (True, False):
        with pytest.raises(PackageError, match=message):
            ortspec.load(root, verify=verify)


def entry(manifest, path):
    return next(f for m in (manifest["target"], manifest["tokenizer"]) for f in m["files"] if f["path"] == path)


def relist(root, path):
    """Make the manifest's entry for `path` match the file (as if exported so)."""
    written = dataclasses.asdict(file_entry(root, root / path))
    edit_manifest(root, lambda m: entry(m, path).update(written))


def test_a_graph_the_manifest_does_not_list_is_refused(copy_of):
    root = copy_of(family="llama", draft=None)
    shutil.copyfile(root / "target" / "model.onnx", root / "target" / "other.onnx")
    edit_manifest(root, lambda m: m["target"].update(onnx="target/other.onnx"))
    with pytest.raises(PackageError, match=r"target\.onnx names target/other\.onnx, which target\.files does not list"):
        ortspec.load(root, verify=False)


def point_external_data_at(graph, location):
    """Make every external tensor of `graph` name `location` (onnx refuses to write paths that leave the graph's
    directory; a hostile file can hold them)."""
    model = onnx.load(graph, load_external_data=False)
    for tensor in model.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = location
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location", ["model.onnx.data", "../../outside.data", "/tmp/outside.data"])
def test_external_data_the_manifest_does_not_list_is_refused(copy_of, location):
    root = copy_of(family="llama", draft=None)  # the builder keeps its weights in target/model.onnx.data
    point_external_data_at(root / "target" / "model.onnx", location)
    relist(root, "target/model.onnx")
    graph_only = lambda m: m["target"].update(files=[f for f in m["target"]["files"] if ".data" not in f["path"]])  # noqa: E731
    edit_manifest(root, graph_only)
    with pytest.raises(PackageError, match=f"reads external data from '{location}', which target.files does not"):
        ortspec.load(root, verify=False)


def test_listed_external_data_loads_and_runs(copy_of):
    root = copy_of(family="llama", draft=None)
    listed = [f["path"] for f in json.loads((root / "manifest.json").read_text())["target"]["files"]]
    assert listed == ["target/model.onnx", "target/model.onnx.data"]
    assert len(ortspec.load(root).generate([5, 6], max_new_tokens=3).token_ids) == 3


def test_the_kv_layout_is_read_from_the_graph_not_the_exporter_name(package):
    root = package("llama", draft=None)
    model = onnx.load(root / "target" / "model.onnx")
    files = [root / "target" / "model.onnx"]
    common = dict(role="target", root=root, files=files, family="llama", source="", max_positions=8, quantization={})
    assert describe_model(model, exporter="optimum", **common).kv_layout == "shared-buffer"
