"""Export at the sizes people run: peak RSS and time of `ortspec export`, package size, for random-weight
checkpoints of real shapes (the values do not matter for memory or speed), written tensor by tensor so
that making them needs no more memory than one tensor.

    python benchmarks/scale.py --shapes 135M 360M --quantize int4 [--work DIR]
    python benchmarks/scale.py --shapes 1.17B --gguf Q4_0 Q4_1 Q4_K_M [--work DIR]

`--gguf TYPE...` exports GGUF files of the shape instead: every 2-D tensor random raw blocks of TYPE (or
of llama.cpp's Q4_K_M mix, simplified: Q6_K for attn_v, ffn_down and the output), written tensor by
tensor with gguf.GGUFWriter, the tokenizer of the suite's tiny GGUFs. Each block's codes span its range
as llama.cpp's reference quantizer leaves them (a Q4_0 block's largest code -8, a Q4_1 block's 0 and 15).
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


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def write_gguf_checkpoint(path: Path, shape: str, weights: str, seed: int = 0) -> Path:
    """A random Llama GGUF of `shape`, its 2-D tensors raw `weights` blocks (a GGML type or Q4_K_M), one tensor
    in memory at a time."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES

    from ortspec.models.random import make_tokenizer

    from helpers.gguf_files import add_bpe_tokenizer, q4_k_m, random_blocks

    s = SHAPES[shape]
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = path.parent / f"{path.stem}-tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    make_tokenizer(tokenizer_dir, 384)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random {shape} {weights}")
    writer.add_context_length(8192)
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["intermediate"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(s["hidden"] // s["heads"])
    add_bpe_tokenizer(writer, tokenizer_dir)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    shapes = {gguf_name(name): dims for name, dims in tensor_shapes(s).items()}
    mix = q4_k_m if weights == "Q4_K_M" else lambda name: weights
    kinds = {name: mix(name) for name, dims in shapes.items() if len(dims) == 2}
    for name, dims in shapes.items():
        if name in kinds:
            kind = GGMLQuantizationType[kinds[name]]
            size, nbytes = GGML_QUANT_SIZES[kind]
            row = dims[1] // size * nbytes
            writer.add_tensor_info(name, [dims[0], row], np.dtype(np.uint8), dims[0] * row, raw_dtype=kind)
        else:
            writer.add_tensor_info(name, list(dims), np.dtype(np.float32), 4 * int(np.prod(dims)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in shapes.items():
        if name not in kinds:
            writer.write_tensor_data(np.ones(dims, np.float32))
            continue
        raw = random_blocks(kinds[name], *dims, rng)
        if kinds[name] in ("Q4_0", "Q4_1"):  # element 0 code 0 (-8 for Q4_0), element 16 code 15 (Q4_1's max)
            blocks = raw.reshape(dims[0], -1, raw.shape[1] // (dims[1] // 32))
            at = 2 if kinds[name] == "Q4_0" else 4
            blocks[:, :, at] = (blocks[:, :, at] & 0xF0) | (0xF0 if kinds[name] == "Q4_1" else 0)
        writer.write_tensor_data(raw)
    writer.close()
    return path


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
    parser.add_argument("--gguf", nargs="+", default=[], help="export GGUFs of these types (Q4_0, Q4_1, Q4_K_M...)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ortspec-scale-"))
    print(f"| shape | checkpoint GB | export s | export peak RSS GB | package GB | ({args.quantize}) |")
    print("|---|---|---|---|---|---|")
    for shape, weights in [(shape, weights) for shape in args.shapes for weights in args.gguf or [None]]:
        if weights:
            ckpt = work / f"{shape}-{weights}.gguf"
            if not ckpt.is_file():
                write_gguf_checkpoint(ckpt, shape, weights)
        else:
            ckpt = work / f"ckpt-{shape}"
            if not (ckpt / "model.safetensors").is_file():
                write_checkpoint(ckpt, shape)
        out = work / (f"pkg-{shape}" + (f"-{weights}" if weights else ""))
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
        source = ckpt.stat().st_size if weights else directory_size(ckpt)
        label = f"{shape} {weights}" if weights else shape
        print(f"| {label} | {source / 1e9:.3f} | {seconds:.1f} | {rss:.2f} | {size:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
