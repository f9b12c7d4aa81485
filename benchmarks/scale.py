"""Export at the sizes people run: peak RSS and time of `ortspec export`, package size, for random-weight
checkpoints of real shapes (the values do not matter for memory or speed), written tensor by tensor so
that making them needs no more memory than one tensor.

    python benchmarks/scale.py --shapes 135M 360M --quantize int4 [--work DIR]
    python benchmarks/scale.py --shapes 135M 1.17B 3B --llama-cpp /work/tools/llama.cpp --work /work/data/scale
    python benchmarks/scale.py --shapes 1.17B --gguf Q4_0 Q4_1 Q4_K_M [--work DIR]
    python benchmarks/scale.py --shapes 8B --gguf Q4_0 --tokenizer-gguf SmolLM2-135M-Instruct.Q4_1.gguf --load

With `--llama-cpp` (a build from benchmarks/build_llama_cpp.sh), each shape also goes through llama.cpp in the
same run: its converter (`--outtype f16`) then `llama-quantize` Q4_0 on the same checkpoint; ortspec exports
that Q4_0 GGUF too, and the table sets package against GGUF size, the loaded package's RSS, and the cost
t(n) of one forward pass over n new positions after `--context` cached ones, ours (calibration timing) next
to llama-bench's, for n in 1, 2, 4, 8. The checkpoint carries the SmolLM2 tokenizer rebuilt from
`--tokenizer-gguf` (llama.cpp's converter only accepts byte-level BPE tokenizers it knows; the rest of its
vocabulary is padding), so both exports see the same files.

`--gguf TYPE...` exports GGUF files of the shape instead: every 2-D tensor random raw blocks of TYPE (or
of llama.cpp's Q4_K_M mix, simplified: Q6_K for attn_v, ffn_down and the output), written tensor by
tensor with gguf.GGUFWriter (no fp32 checkpoint on disk), the tokenizer of the suite's tiny GGUFs or, with
`--tokenizer-gguf`, that file's. Each block's codes span its range as llama.cpp's reference quantizer
leaves them (a Q4_0 block's largest code -8, a Q4_1 block's 0 and 15). `--load` (implied by `--llama-cpp`)
adds the loaded package's RSS and t(n).

Each step runs in a child process under `/usr/bin/time -v` (its peak RSS is the child's own) and, with
`--address-space`, under `prlimit --as`. One shape at a time; a shape's files are deleted after its row
unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from llama_peer import LlamaCpp, Timed, timed
from load_memory import load_memory

# Llama-family shapes: hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
SHAPES = {
    "135M": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "360M": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152, tied=True),
    "1.17B": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=49152, tied=False),
    "3B": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "8B": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),
}
SMOLLM2_GGUF = Path.home() / ".cache/ortspec/models/SmolLM2-135M-Instruct.Q4_1.gguf"
Q4_0_BLOCK = 18  # bytes per 32 weights: an fp16 scale and 16 bytes of 4-bit codes


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


def write_checkpoint(directory: Path, shape: str | dict, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A random fp32 Llama checkpoint of `shape` (a name in SHAPES or such a dict: config, a 384-token
    tokenizer or the one rebuilt from the GGUF file `tokenizer`, model.safetensors), one tensor in memory
    at a time."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from ortspec.models.random import make_tokenizer

        make_tokenizer(directory, 384)
    else:
        from ortspec.export.builder.gguf_io import open_gguf
        from ortspec.export.gguf_tokenizer import write_gguf_tokenizer

        write_gguf_tokenizer(open_gguf(tokenizer), directory)
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


def copy_tokenizer(writer: Any, source: Path, vocab: int) -> None:
    """The tokenizer metadata of the GGUF file `source`, padded to `vocab` tokens as llama.cpp's converter pads
    a vocabulary ("[PADi]", unused)."""
    from gguf import TokenType

    from ortspec.export.builder.gguf_io import open_gguf

    meta = open_gguf(source).metadata
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [TokenType.UNUSED] * (len(tokens) - len(types))
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta.get("tokenizer.ggml.pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None:
            add(meta[f"tokenizer.ggml.{key}_token_id"])


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


def write_gguf_checkpoint(
    path: Path, shape: str | dict, weights: str, seed: int = 0, tokenizer: Path | None = None
) -> Path:
    """A random Llama GGUF of `shape`, its 2-D tensors raw `weights` blocks (a GGML type or Q4_K_M), one tensor
    in memory at a time; with `tokenizer` (a GGUF file), that file's tokenizer padded to the vocabulary."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES

    from ortspec.models.random import make_tokenizer

    from helpers.gguf_files import add_bpe_tokenizer, q4_k_m, random_blocks

    s = SHAPES[shape] if isinstance(shape, str) else shape
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random Llama {s['hidden']}x{s['layers']} {weights}")
    writer.add_context_length(8192)
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["intermediate"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(s["hidden"] // s["heads"])
    if tokenizer is None:
        tokenizer_dir = path.parent / f"{path.stem}-tokenizer"
        tokenizer_dir.mkdir(exist_ok=True)
        make_tokenizer(tokenizer_dir, 384)
        add_bpe_tokenizer(writer, tokenizer_dir)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    else:
        copy_tokenizer(writer, tokenizer, s["vocab"])
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


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(source: Path, out: Path, quantize: str, address_space: int | None) -> Timed:
    """`ortspec export SOURCE --out OUT --quantize Q` in a child process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "from ortspec.cli import main; main()", "export", str(source), "--out", str(out)]
    return timed([*command, "--quantize", quantize], address_space)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def row(run: Timed) -> str:
    return f"{run.seconds:.1f} s ({run.cpu_s:.0f} CPU s), {run.rss_gb:.2f} GB"


def compare_shape(shape: str, args: argparse.Namespace, llama: LlamaCpp | None) -> None:
    """One shape: our export of the checkpoint and, with llama.cpp, its convert + quantize, our export of
    its Q4_0 GGUF, load RSS and t(n) of both; prints the table rows."""
    work: Path = args.work
    ckpt, ours_pkg = work / f"ckpt-{shape}", work / f"pkg-{shape}"
    tokenizer = (args.tokenizer_gguf or SMOLLM2_GGUF) if llama else None
    if not (ckpt / "model.safetensors").is_file():
        write_checkpoint(ckpt, shape, tokenizer=tokenizer)
    size = directory_size(ckpt) / 1e9
    ours = export(ckpt, ours_pkg, args.quantize, args.address_space)
    package = directory_size(ours_pkg) / 1e9
    if llama is None:
        print(f"| {shape} | {size:.2f} | {ours.seconds:.1f} | {ours.rss_gb:.2f} | {package:.3f} | |", flush=True)
        return
    f16, q4 = work / f"{shape}.f16.gguf", work / f"{shape}.Q4_0.gguf"
    peer = llama.convert(ckpt, f16, "f16", args.address_space)
    peer += llama.quantize(f16, q4, "Q4_0", args.threads, args.address_space)
    f16.unlink()
    if not args.keep:
        shutil.rmtree(ckpt)
    print(
        f"| {shape} | checkpoint {size:.2f} GB -> package | ortspec export --quantize {args.quantize}: "
        f"{row(ours)} | llama.cpp convert f16 + quantize Q4_0: {row(peer)} | "
        f"time {ours.seconds / peer.seconds:.2f}x, CPU {ours.cpu_s / peer.cpu_s:.2f}x | "
        f"package {package:.3f} GB |",
        flush=True,
    )
    from_gguf(f"{shape} llama.cpp Q4_0", q4, work / f"pkg-{shape}-gguf", args, llama)
    if not args.keep:
        shutil.rmtree(ours_pkg)


def from_gguf(label: str, gguf: Path, out: Path, args: argparse.Namespace, llama: LlamaCpp | None) -> None:
    """Our export of a GGUF, its package against the GGUF and, with `--load` or llama.cpp, load RSS and t(n)
    (beside llama-bench's)."""
    run = export(gguf, out, args.quantize, args.address_space)
    package, gguf_gb = directory_size(out) / 1e9, gguf.stat().st_size / 1e9
    if not (args.load or llama):
        print(f"| {label} | {gguf_gb:.3f} | {run.seconds:.1f} | {run.rss_gb:.2f} | {package:.3f} | |", flush=True)
        return
    loaded = load_memory(out, args.threads, args.max_length, 16, steps=max(args.n), context=args.context)
    ours = {n: loaded["t_ms"][n - 1] for n in args.n}
    cells = [f"{n}: {ours[n]:.1f}" for n in args.n]
    if llama is not None:
        theirs = llama.step_ms(gguf, args.n, args.context, args.threads)
        cells = [f"{n}: {ours[n]:.1f} / {theirs[n]:.1f} ({ours[n] / theirs[n]:.2f}x)" for n in args.n]
    print(
        f"| {label} | GGUF {gguf_gb:.3f} GB -> package {package:.3f} GB ({package / gguf_gb:.2f}x) | "
        f"ortspec export --quantize {args.quantize}: {row(run)} | "
        f"load RSS {loaded['loaded']['VmRSS'] / 1e9:.2f} GB (max length {args.max_length}) | "
        f"t(n) ms ours / llama.cpp, context {args.context}: {'; '.join(cells)} |",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(out)
        gguf.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["135M", "360M"], choices=list(SHAPES))
    parser.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument(
        "--work", type=Path, default=None, help="where checkpoints and packages go (default: a temp dir)"
    )
    parser.add_argument("--address-space", type=int, default=None, help="prlimit --as for each step, in bytes")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp tree built by benchmarks/build_llama_cpp.sh")
    parser.add_argument("--gguf", nargs="+", default=[], help="export GGUFs of these types (Q4_0, Q4_1, Q4_K_M...)")
    parser.add_argument(
        "--tokenizer-gguf", type=Path, help="a GGUF whose tokenizer the files carry (with --llama-cpp: SmolLM2's)"
    )
    parser.add_argument("--load", action="store_true", help="also load each package: RSS and t(n)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="cached positions before each t(n) call")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="the n of t(n)")
    parser.add_argument("--max-length", type=int, default=2048, help="the loaded package's KV length")
    parser.add_argument("--keep", action="store_true", help="keep each shape's checkpoint, GGUF and packages")
    args = parser.parse_args()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="ortspec-scale-"))
    args.work.mkdir(parents=True, exist_ok=True)
    llama = LlamaCpp(args.llama_cpp) if args.llama_cpp else None
    print(f"load average before: {load_average()}")
    if not (llama or args.load):
        print(f"| shape | checkpoint GB | export s | export peak RSS GB | package GB | ({args.quantize}) |")
        print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        for weights in args.gguf:
            gguf = args.work / f"{shape}-{weights}.gguf"
            if not gguf.is_file():
                write_gguf_checkpoint(gguf, shape, weights, tokenizer=args.tokenizer_gguf)
            from_gguf(f"{shape} {weights}", gguf, args.work / f"pkg-{shape}-{weights}", args, llama)
        if not args.gguf:
            compare_shape(shape, args, llama)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
