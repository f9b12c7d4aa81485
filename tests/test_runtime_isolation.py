"""Serving needs onnxruntime, numpy and tokenizers only: prove torch/transformers/optimum never load."""

from __future__ import annotations

import json
import subprocess
import sys

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
