"""How closely ortspec's exports of llama.cpp-made GGUFs follow those files' own weights.

From one GGUF (default: the real SmolLM2-135M-Instruct Q4_1) it writes a Hugging Face fp32 checkpoint: the
file's dequantized weights under HF names with llama.cpp's q/k row permutation undone (`GGUFCheckpoint`), its
config and its tokenizer (`gguf_tokenizer`). llama.cpp converts that checkpoint to an f32 GGUF and
`llama-quantize` makes Q4_0, Q4_1, Q8_0 and Q4_K_M files of it with its default tensor mixes. ortspec exports
each file (int4 for Q4_*, int8 for Q8_0) and, as the reference, at fp32 (the same file's weights
dequantized), and scores one against the other on held-out text as `ortspec eval --text T --reference R`
does: top-1 agreement and mean KL per position, and perplexity. `--accuracy-level 0` computes the
quantized matmuls in fp32 instead of int8 (the default, 4): what is left then is the weights alone.

    python benchmarks/gguf_quality.py --llama-cpp /work/tools/llama.cpp [--work /work/data/smollm2-gguf]

The text defaults to benchmarks/quantization_quality.py's standard-library excerpts (the same on any
machine); --text FILE scores your own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from llama_peer import LlamaCpp
from quantization_quality import default_text, package_mb
from scale import SMOLLM2_GGUF

import ortspec
from ortspec.export import export_pair
from ortspec.runtime.evaluate import evaluate, special_prefix, windows

KINDS = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8", "Q4_K_M": "int4"}  # llama-quantize type: our --quantize


def hf_checkpoint(gguf: Path, out: Path) -> Path:
    """An fp32 HF checkpoint of a llama-architecture GGUF file's dequantized weights (one tensor at a time)."""
    from safetensors.numpy import save_file

    from ortspec.export.builder.gguf_io import GGUFCheckpoint
    from ortspec.export.gguf_tokenizer import write_gguf_tokenizer

    checkpoint = GGUFCheckpoint(gguf)
    out.mkdir(parents=True, exist_ok=True)
    write_gguf_tokenizer(checkpoint.model, out)
    (out / "config.json").write_text(json.dumps(checkpoint.model.config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps(checkpoint.model.generation_config(), indent=2))
    save_file(
        {name: np.ascontiguousarray(checkpoint.get(name)) for name in checkpoint.names()}, out / "model.safetensors"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a tree built by benchmarks/build_llama_cpp.sh")
    parser.add_argument("--source", type=Path, default=SMOLLM2_GGUF, help="the GGUF whose weights start it all")
    parser.add_argument("--work", type=Path, default=Path("/work/data/smollm2-gguf"))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--text", type=Path, help="UTF-8 text to score (default: standard-library excerpts)")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4], help="of our int4/int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    llama = LlamaCpp(args.llama_cpp)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        checkpoint = hf_checkpoint(args.source, work / "hf-fp32")
        llama.convert(checkpoint, f32, "f32")
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    print(
        f"source {args.source.name}; llama.cpp {args.llama_cpp}; threads {args.threads}; "
        f"accuracy level {args.accuracy_level}"
    )
    print("| llama.cpp file | GGUF MB | ortspec export | package MB | top-1 agreement | mean KL (nats) | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        gguf = work / f"{kind}.gguf"
        if not gguf.is_file():
            llama.quantize(f32, gguf, kind, args.threads)
        packages = {}
        for quantize in (KINDS[kind], "none"):
            level = args.accuracy_level if quantize != "none" else 4  # fp32 weights: no quantized matmul
            out = work / f"pkg-{kind}-{quantize}" if level == 4 else work / f"pkg-{kind}-{quantize}-level{level}"
            if not (out / "manifest.json").is_file():
                export_pair(
                    gguf,
                    out,
                    exporter="builder",
                    quantize=quantize,
                    accuracy_level=level,
                    force=True,
                    report=lambda _: None,
                )
            packages[quantize] = out
        quantized, reference = (ortspec.load(packages[q], threads=args.threads, verify=False) for q in packages)
        tokens = reference.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]
        pieces = windows(tokens, args.window, special_prefix(reference.tokenizer))
        report = evaluate(quantized.target, pieces, reference=reference.target)
        print(
            f"| {kind} | {gguf.stat().st_size / 1e6:.0f} | {KINDS[kind]} | {package_mb(packages[KINDS[kind]]):.0f} "
            f"| {report.top1_agreement:.2%} | {report.mean_kl:.4f} | {report.perplexity:.2f} |",
            flush=True,
        )
    print(f"text: {sum(len(p) - 1 for p in pieces):,} positions in {len(pieces)} windows")


if __name__ == "__main__":
    main()
