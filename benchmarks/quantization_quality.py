"""What each `--quantize` choice costs in quality and buys in size and speed, on one model.

Exports the target at fp32, int8 and int4 (block 32, 64, 128; for a GGUF, block 32 also with its blocks
re-quantized: `--gguf-blocks requantize`) with the builder (cached in --work: delete it after changing the export),
scores each on the same text against the fp32 export (`ortspec eval`'s measures: perplexity, top-1
agreement, mean KL), and times a decode step t(1) at context 64, all in one run. Prints a Markdown
table for docs/benchmarks.md ("Quantization quality").

    python benchmarks/quantization_quality.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2

The default text is reproducible on any machine: the first lines of a few CPython standard-library
modules (code and docstrings); pass --text FILE to score your own.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from pathlib import Path

import ortspec
from ortspec.export import export_pair
from ortspec.runtime.evaluate import evaluate, special_prefix, windows
from ortspec.runtime.model.decoder import DecoderState

VARIANTS = {  # label: export options
    "fp32": dict(quantize="none"),
    "int8": dict(quantize="int8"),
    "int4 b32": dict(quantize="int4", block_size=32),  # a GGUF's Q4_1 and Q8_0 blocks kept (the default)
    "int4 b32 requantized": dict(quantize="int4", block_size=32, keep_gguf_blocks=False),
    "int4 b64": dict(quantize="int4", block_size=64),
    "int4 b128": dict(quantize="int4", block_size=128),
}
STDLIB_TEXTS = ("textwrap.py", "argparse.py", "functools.py", "json/decoder.py", "calendar.py")


def default_text(lines: int = 300) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join("".join((lib / name).read_text().splitlines(keepends=True)[:lines]) for name in STDLIB_TEXTS)


def step_ms(pipe: ortspec.Pipeline, context: int = 64, steps: int = 64, repeats: int = 3) -> float:
    """Median time of a one-token target call after `context` positions."""
    target = DecoderState(pipe.target)
    times = []
    for _ in range(repeats):
        target.reset()
        target.forward(list(range(1, context + 1)))
        for i in range(steps):
            start = time.perf_counter()
            target.forward([100 + i])
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def package_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="HF checkpoint directory or GGUF file")
    parser.add_argument("--text", type=Path, help="UTF-8 text to score (default: standard-library excerpts)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-quantization"), help="export cache")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()

    packages = {}
    for label, options in VARIANTS.items():
        out = args.work / label.replace(" ", "-")
        if not (out / "manifest.json").is_file():
            export_pair(args.target, out, exporter="builder", force=True, report=lambda _: None, **options)
        packages[label] = out
    pipes = {label: ortspec.load(path, threads=args.threads, verify=False) for label, path in packages.items()}
    reference = pipes["fp32"]
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    tokens = reference.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]
    pieces = windows(tokens, args.window, special_prefix(reference.tokenizer))
    print(f"text: {sum(len(p) - 1 for p in pieces):,} positions in {len(pieces)} windows; threads {args.threads}")
    print("| export | perplexity | top-1 agreement with fp32 | mean KL (nats) | package MB | t(1) ms, ctx 64 |")
    print("|---|---|---|---|---|---|")
    for label, pipe in pipes.items():
        report = evaluate(pipe.target, pieces, reference=reference.target if label != "fp32" else None)
        agreement = "-" if report.top1_agreement is None else f"{report.top1_agreement:.1%}"
        kl = "-" if report.mean_kl is None else f"{report.mean_kl:.4f}"
        print(
            f"| {label} | {report.perplexity:.2f} | {agreement} | {kl} | {package_mb(packages[label]):.0f} "
            f"| {step_ms(pipe):.2f} |"
        )


if __name__ == "__main__":
    main()
