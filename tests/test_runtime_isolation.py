"""Serving needs onnxruntime, numpy and tokenizers only: prove torch/transformers/optimum never load.
Also the layering of the packages: export never imports the shipped models."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import ortspec

SCRIPT = """
import importlib.abc, json, sys

HEAVY = ("torch", "transformers", "optimum")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} must not be imported at serve time")
        return None

sys.meta_path.insert(0, Blocker())
import ortspec
pipe = ortspec.load(sys.argv[1])
res = pipe.generate("def fibonacci(n):", max_new_tokens=8)
plain = pipe.generate("def fibonacci(n):", max_new_tokens=8, use_draft=False)
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY})
print(json.dumps({"tokens": res.token_ids, "plain": plain.token_ids, "heavy": loaded}))
"""


def test_serving_loads_no_torch_transformers_or_optimum(package):
    root = package("llama", draft="close", quantize="int4")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert len(result["tokens"]) == 8 and result["tokens"] == result["plain"]


def test_export_does_not_import_the_shipped_models():
    """models/ holds shipped models and recipes that use export; export must not depend back on them."""
    root = Path(ortspec.__file__).parent
    offenders = []
    for file in sorted((root / "export").rglob("*.py")):
        package = ".".join(file.relative_to(root.parent).parent.parts)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(part for part in (base, node.module) if part)
                if module == "ortspec.models" or module.startswith("ortspec.models."):
                    offenders.append(f"{file.relative_to(root)}: {module}")
    assert offenders == []
