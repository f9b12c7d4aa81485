"""Export at the sizes people run: peak RSS and time of `ortspec export`, package size, for random-weight
checkpoints of real shapes (the values do not matter for memory or speed), written tensor by tensor so
that making them needs no more memory than one tensor.

    python benchmarks/scale.py --shapes 135M 360M --quantize int4 [--work DIR]

Each export runs in a child process under `/usr/bin/time -v` (its peak RSS is the child's own).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama-family shapes: hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
SHAPES = {
    "135M": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "360M": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152, tied=True),
    "1.17B": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=49152, tied=False),
    "3B": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
}


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = s["hidden"], s["hidden"] // s["heads"]
    q, kv, ff = s["heads"] * head_dim, s["kv_heads"] * head_dim, s["intermediate"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (s["vocab"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not s["tied"]:
        shapes["lm_head.weight"] = (s["vocab"], hidden)
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (ff, hidden),
            f"{p}.mlp.up_proj.weight": (ff, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, ff),
        }
    return shapes


def write_checkpoint(directory: Path, shape: str | dict, seed: int = 0) -> Path:
    """A random fp32 Llama checkpoint of `shape` (a name in SHAPES or such a dict: config, a 384-token
    tokenizer, model.safetensors), one tensor in memory at a time."""
    from ortspec.models.random import make_tokenizer

    s = SHAPES[shape] if isinstance(shape, str) else shape
    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory, 384)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": s["tied"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes, header, offset = tensor_shapes(s), {}, 0
    for name, dims in shapes.items():
        size = 4 * int(np.prod(dims))
        header[name] = {"dtype": "F32", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for dims in shapes.values():
            if len(dims) == 1:
                w = np.ones(dims, np.float32)
            else:
                w = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)
            w.tofile(f)
    return directory


def timed(command: list[str], address_space: int | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB, output) of `command` under /usr/bin/time -v (and prlimit --as)."""
    prefix = ["prlimit", f"--as={address_space}"] if address_space else []
    start = time.perf_counter()
    done = subprocess.run([*prefix, "/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, int(rss.group(1)) / 1e6 if rss else float("nan"), done.stdout


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["135M", "360M"], choices=list(SHAPES))
    parser.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument(
        "--work", type=Path, default=None, help="where checkpoints and packages go (default: a temp dir)"
    )
    parser.add_argument("--address-space", type=int, default=None, help="prlimit --as for each export, in bytes")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ortspec-scale-"))
    print(f"| shape | checkpoint GB | export s | export peak RSS GB | package GB | ({args.quantize}) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        ckpt = work / f"ckpt-{shape}"
        if not (ckpt / "model.safetensors").is_file():
            write_checkpoint(ckpt, shape)
        out = work / f"pkg-{shape}"
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable,
            "-c",
            "from ortspec.cli import main; main()",
            "export",
            str(ckpt),
            "--out",
            str(out),
            "--quantize",
            args.quantize,
        ]
        seconds, rss, _ = timed(command, args.address_space)
        size = directory_size(out) / 1e9
        print(f"| {shape} | {directory_size(ckpt) / 1e9:.2f} | {seconds:.1f} | {rss:.2f} | {size:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
