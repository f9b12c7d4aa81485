"""The builder exports supported families (safetensors or GGUF) in a process where torch, transformers and
optimum cannot load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.gguf_files import write_gguf

SCRIPT = """
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
from ortspec.export import export_pair
manifest = export_pair(sys.argv[1], sys.argv[3], draft=sys.argv[2], quantize="int4", report=lambda _: None)
print(json.dumps([manifest.target.exporter, manifest.draft.exporter, manifest.target.quantization["bits"]]))
"""


def sources(kind: str, checkpoint, tmp_path) -> tuple[str, str]:
    if kind == "safetensors":
        return checkpoint("qwen3"), checkpoint("qwen3", "close")
    # GGUF target and draft, written here (the writer reads safetensors with numpy, not torch)
    return tuple(
        write_gguf(checkpoint("llama", role), tmp_path / f"{role}.gguf", weights="Q8_0") for role in ("target", "close")
    )


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_builder_export_needs_no_torch(kind, checkpoint, tmp_path):
    target, draft = sources(kind, checkpoint, tmp_path)
    out = tmp_path / "pkg"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(target), str(draft), str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["builder", "builder", 4]
    import ortspec

    pipe = ortspec.load(out)
    spec = pipe.generate([3, 50, 7], max_new_tokens=12, draft_tokens=4)
    assert spec.token_ids == pipe.generate([3, 50, 7], max_new_tokens=12, use_draft=False).token_ids
