"""What each `--quantize` choice costs in quality and buys in size and speed, on one model.

Exports the target at fp32, int8 (MatMulNBits, and `--int8-kernel gemm` with its lm_head on the GEMM or not)
and int4 (block 32, 64, 128; block 32 also with `--lm-head-kernel gemm`; for a GGUF, block 32 also with its
blocks re-quantized: `--gguf-blocks requantize`) with the builder (cached in
--work: delete it after changing the export), scores each on the same text against the fp32 export
(`ortspec eval`'s measures: perplexity, top-1 agreement, mean KL), and times, all in one run, a call adding
1, 4 and 8 positions at context 64 (t(n), v(n) = t(n)/t(1)) and a prefill of `--prefill` fresh tokens,
the exports interleaved in each of `--passes` passes. Prints a Markdown table for docs/benchmarks.md
("Quantization quality").

    python benchmarks/quantization_quality.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
    python benchmarks/quantization_quality.py MODEL.gguf --variants fp32 int4-b32 int8 int8-gemm --threads 1 --clock cpu

`--clock cpu` times this process's CPU time rather than elapsed time (on a machine shared with other jobs,
elapsed time is mostly waiting); use it with `--threads 1`, where no pool thread spins between calls.

The default text is reproducible on any machine: the first lines of a few CPython standard-library
modules (code and docstrings); pass --text FILE to score your own.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ortspec
from ortspec.export import export_pair
from ortspec.runtime.evaluate import evaluate, special_prefix, windows
from ortspec.runtime.model.decoder import DecoderState

from common import load_average

VARIANTS = {  # label: export options
    "fp32": dict(quantize="none"),
    "int8 nbits": dict(quantize="int8", int8_kernel="nbits"),  # MatMulNBits 8-bit, block 32
    "int8 gemm": dict(quantize="int8", int8_kernel="gemm"),  # projections and lm_head per column, MatMulInteger
    "int8 gemm lm_head nbits": dict(quantize="int8", int8_kernel="gemm", lm_head_kernel="nbits"),
    "int4 b32": dict(quantize="int4", block_size=32),  # a GGUF's Q4_1 and Q8_0 blocks kept (the default)
    "int4 b32 lm_head gemm": dict(quantize="int4", block_size=32, lm_head_kernel="gemm"),  # its own int8 copy
    "int4 b32 requantized": dict(quantize="int4", block_size=32, keep_gguf_blocks=False),
    "int4 b64": dict(quantize="int4", block_size=64),
    "int4 b128": dict(quantize="int4", block_size=128),
}
CHOICES = {label.replace(" ", "-"): label for label in VARIANTS}  # as --variants names them
STDLIB_TEXTS = ("textwrap.py", "argparse.py", "functools.py", "json/decoder.py", "calendar.py")


def default_text(lines: int = 300) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join("".join((lib / name).read_text().splitlines(keepends=True)[:lines]) for name in STDLIB_TEXTS)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
POSITIONS = (1, 4, 8)  # t(n): a call adding n positions (a verify call of n - 1 drafts)


def call_costs(
    pipe: ortspec.Pipeline,
    clock: Callable[[], float],
    prefill: int,
    context: int = 64,
    calls: int = 8,
    positions: Sequence[int] = POSITIONS,
) -> dict[str, float]:
    """ms of a call adding n positions after `context` (mean of `calls`, cache rolled back after each) for
    n in `positions`, and of a prefill of `prefill` fresh tokens (only the last position scored; 0: none)."""
    target = DecoderState(pipe.target)
    target.reset()
    target.forward(list(range(1, context + 1)))
    costs = {}
    for n in positions:
        start = clock()
        for i in range(calls):
            target.forward([100 + i + j for j in range(n)])
            target.truncate(context)
        costs[f"t({n})"] = (clock() - start) * 1000 / calls
    if prefill:
        target.reset()
        start = clock()
        target.forward([(7 * i + 3) % pipe.target.vocab_size for i in range(prefill)], last_only=True)
        costs["prefill"] = (clock() - start) * 1000
    return costs


def interleaved_costs(
    pipes: dict[str, ortspec.Pipeline], clock: Callable[[], float], prefill: int, passes: int
) -> dict[str, dict[str, list[float]]]:
    """`call_costs` of every package in each of `passes` passes (after one warm-up pass), so that load
    from other jobs touches all alike: label -> measure -> one value per pass."""
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in pipes}
    for done in range(passes + 1):
        for label, pipe in pipes.items():
            for name, ms in call_costs(pipe, clock, prefill).items():
                if done:
                    samples[label].setdefault(name, []).append(ms)
    return samples


def spread(values: list[float], digits: int = 1) -> str:
    """Median and range of `values`: "4.9 (4.7-5.3)"."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


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
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(CHOICES),
        help="exports to compare (fp32 always)",
    )
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what the timings measure")
    parser.add_argument("--passes", type=int, default=5, help="timing passes over all exports")
    parser.add_argument("--prefill", type=int, default=500, help="fresh tokens of the timed prefill")
    args = parser.parse_args()
    chosen = {"fp32", *(CHOICES[v] for v in args.variants)} if args.variants else set(VARIANTS)

    packages = {}
    for label, options in VARIANTS.items():
        if label not in chosen:
            continue
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
    print(f"load average before: {load_average()}")
    costs = interleaved_costs(pipes, CLOCKS[args.clock], args.prefill, args.passes)
    print(f"load average after timing: {load_average()}")
    print(
        f"| export | perplexity | top-1 agreement with fp32 | mean KL (nats) | package MB | {args.clock} ms: t(1) "
        f"| v(4) | v(8) | prefill {args.prefill}: tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, pipe in pipes.items():
        report = evaluate(pipe.target, pieces, reference=reference.target if label != "fp32" else None)
        agreement = "-" if report.top1_agreement is None else f"{report.top1_agreement:.1%}"
        kl = "-" if report.mean_kl is None else f"{report.mean_kl:.4f}"
        c = costs[label]
        v4, v8 = ([a / b for a, b in zip(c[f"t({n})"], c["t(1)"], strict=True)] for n in (4, 8))
        rate = [args.prefill * 1000 / ms for ms in c["prefill"]]
        print(
            f"| {label} | {report.perplexity:.2f} | {agreement} | {kl} | {package_mb(packages[label]):.0f} "
            f"| {spread(c['t(1)'], 2)} | {spread(v4, 2)} | {spread(v8, 2)} | {spread(rate, 0)} |"
        )


if __name__ == "__main__":
    main()
