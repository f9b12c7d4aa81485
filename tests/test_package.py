"""The package format: what export writes, and the clear errors the runtime gives for bad packages."""

from __future__ import annotations

import json
import shutil

import pytest

import ortspec
from ortspec.runtime.manifest import FORMAT_VERSION, PackageError, load_manifest, sha256_of


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
