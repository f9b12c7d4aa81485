"""GGUFs made by llama.cpp's own converter from the test suite's tiny random checkpoints, exported by ortspec,
against the package exported from the checkpoint itself: per architecture, the largest logit difference over
a 30-token prefill and 10 single steps, and whether 40 greedy tokens agree.

    python benchmarks/gguf_converter_parity.py --llama-cpp PATH/TO/llama.cpp [--work DIR]

The converter (convert_hf_to_gguf.py, F32 output) runs in a child process with its own gguf-py. The
checkpoints' byte-level BPE tokenizer has no pre-tokenizer hash llama.cpp knows (it is called "default"),
and they have no tokenizer.model (phi3 and llama take the gpt2 vocabulary path). Prints one JSON line per
architecture, with whether the converter's file holds the same model metadata and tensors as the one
the test suite writes (`tests/helpers/gguf_files.py`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import ortspec
from ortspec.export import export_pair
from ortspec.export.builder.gguf_io import open_gguf
from ortspec.models.random import make_checkpoint
from ortspec.runtime.model.decoder import DecoderState

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers.cases import FAMILY_SHAPES, VARIANTS
from helpers.gguf_files import write_gguf

CASES = [("qwen3", ""), ("gemma3_text", "gguf"), ("phi3", ""), ("mistral", "wide-heads"), ("llama", "")]
CHILD = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
from conversion.base import TextModel
from conversion.phi import Phi3MiniModel

sentencepiece = TextModel._set_vocab_sentencepiece
def no_tokenizer_model(self, *args, **kwargs):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("tokenizer.model")
    return sentencepiece(self, *args, **kwargs)

TextModel._set_vocab_sentencepiece = no_tokenizer_model
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def logits(pipe: ortspec.Pipeline, ids: list[int]) -> np.ndarray:
    state = DecoderState(pipe.target)
    return np.concatenate([state.forward(ids[:30])] + [state.forward([t]) for t in ids[30:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp checkout")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-gguf-parity"))
    args = parser.parse_args()
    for family, variant in CASES:
        work = args.work / family
        shape = {**FAMILY_SHAPES.get(family, {}), **VARIANTS[variant]}  # as the suite's conftest merges them
        checkpoint = make_checkpoint(work / "checkpoint", family, seed=0, **shape)
        gguf = work / "model.gguf"
        command = [sys.executable, "-c", CHILD, str(args.llama_cpp.resolve()), str(checkpoint)]
        subprocess.run([*command, "--outfile", str(gguf), "--outtype", "f32"], check=True, capture_output=True)
        packages = []
        for source, out in ((gguf, work / "from-gguf"), (checkpoint, work / "from-checkpoint")):
            export_pair(source, out, quantize="none", force=True, report=lambda _: None)
            packages.append(ortspec.load(out))
        ids = [int(i) for i in np.random.default_rng(0).integers(2, packages[0].target.vocab_size, size=40)]
        greedy = [p.generate(ids[:5], max_new_tokens=40, use_draft=False).token_ids for p in packages]
        row = {
            "checkpoint": family + (f" ({variant})" if variant else ""),
            "gguf_architecture": open_architecture(gguf),
            "built_as": packages[0].manifest.target.family,
            "max_abs_logit_diff": float(np.abs(logits(packages[0], ids) - logits(packages[1], ids)).max()),
            "greedy_equal": greedy[0] == greedy[1],
            "same_as_suite_writer": same_file(gguf, write_gguf(checkpoint, work / "suite.gguf")),
        }
        print(json.dumps(row), flush=True)


def open_architecture(gguf: Path) -> str:
    return open_gguf(gguf).architecture


def same_file(a: Path, b: Path) -> bool:
    """The same model metadata (tokenizer and general.* aside) and the same tensors, value for value."""
    first, second = open_gguf(a), open_gguf(b)

    def model_keys(meta: dict) -> dict:
        return {k: v for k, v in meta.items() if not k.startswith(("tokenizer.", "general."))}

    return (
        model_keys(first.metadata) == model_keys(second.metadata)
        and first.tensors.keys() == second.tensors.keys()
        and all(np.array_equal(first.dequantized(n), second.dequantized(n)) for n in first.tensors)
    )


if __name__ == "__main__":
    main()
