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
    python benchmarks/quantization_quality.py MODEL.gguf --variants int4-b32 --provider cpu openvino --threads 1

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
from ortspec.runtime.model.onnx_model import Model

from common import PROVIDERS, load_average, open_target

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
POSITIONS = (1, 2, 4, 8)  # t(n): a call adding n positions (a verify call of n - 1 drafts)


def call_costs(
    model: Model,
    clock: Callable[[], float],
    prefill: int,
    context: int = 64,
    calls: int = 8,
    positions: Sequence[int] = POSITIONS,
) -> dict[str, float]:
    """ms of a call adding n positions after `context` (mean of `calls`, cache rolled back after each; and
    "first(n)": the first of them) for n in `positions`, and of a prefill of `prefill` fresh tokens (only the
    last position scored; 0: none)."""
    target = DecoderState(model)
    target.reset()
    target.forward(list(range(1, context + 1)))
    costs = {}
    for n in positions:
        times = []
        for i in range(calls):
            start = clock()
            target.forward([100 + i + j for j in range(n)])
            times.append(clock() - start)
            target.truncate(context)
        costs[f"t({n})"], costs[f"first({n})"] = sum(times) * 1000 / calls, times[0] * 1000
    if prefill:
        target.reset()
        start = clock()
        target.forward([(7 * i + 3) % model.vocab_size for i in range(prefill)], last_only=True)
        costs["prefill"] = (clock() - start) * 1000
    return costs


def interleaved_costs(
    models: dict[str, Model], clock: Callable[[], float], prefill: int, passes: int, context: int = 64
) -> dict[str, dict[str, list[float]]]:
    """`call_costs` of every package in each of `passes` passes after a first one, so that load from other
    jobs touches all alike: label -> measure -> one value per pass. The first pass, where every call size is
    new to the session, is kept apart as "first pass <measure>" (one value)."""
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in models}
    for done in range(passes + 1):
        for label, model in models.items():
            for name, ms in call_costs(model, clock, prefill, context).items():
                samples[label].setdefault(name if done else f"first pass {name}", []).append(ms)
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
    parser.add_argument("--context", type=int, default=64, help="cached positions before each timed call")
    parser.add_argument(
        "--provider",
        nargs="+",
        choices=PROVIDERS,
        default=["cpu"],
        help="run each export on each of these (openvino: onnxruntime-openvino's OpenVINO provider, in a venv of "
        "its own); every one is scored against the fp32 export on the CPU provider",
    )
    parser.add_argument(
        "--openvino-config", default="", help="OpenVINO CPU properties as JSON (see benchmarks/matmul_study.py)"
    )
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
    reference = ortspec.load(packages["fp32"], threads=args.threads, verify=False)
    models, exports = {"fp32": reference.target}, {"fp32": packages["fp32"]}
    for label, path in packages.items():
        for provider in args.provider:
            name = label if provider == "cpu" else f"{label} on {provider}"
            if name not in models:
                models[name], exports[name] = open_target(path, provider, args.threads, args.openvino_config), path
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    tokens = reference.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]
    pieces = windows(tokens, args.window, special_prefix(reference.tokenizer))
    print(f"text: {sum(len(p) - 1 for p in pieces):,} positions in {len(pieces)} windows; threads {args.threads}")
    print(f"load average before: {load_average()}")
    costs = interleaved_costs(models, CLOCKS[args.clock], args.prefill, args.passes, args.context)
    print(f"load average after timing: {load_average()}")
    print(
        f"| export | perplexity | top-1 agreement with fp32 | mean KL (nats) | package MB | {args.clock} ms: t(1) "
        f"| v(2) | v(4) | v(8) | prefill {args.prefill}: tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, model in models.items():
        report = evaluate(model, pieces, reference=reference.target if label != "fp32" else None)
        agreement = "-" if report.top1_agreement is None else f"{report.top1_agreement:.1%}"
        kl = "-" if report.mean_kl is None else f"{report.mean_kl:.4f}"
        c = costs[label]
        ratios = [spread([a / b for a, b in zip(c[f"t({n})"], c["t(1)"], strict=True)], 2) for n in (2, 4, 8)]
        rate = [args.prefill * 1000 / ms for ms in c["prefill"]]
        print(
            f"| {label} | {report.perplexity:.2f} | {agreement} | {kl} | {package_mb(exports[label]):.0f} "
            f"| {spread(c['t(1)'], 2)} | {' | '.join(ratios)} | {spread(rate, 0)} |"
        )
    print(f"\nFirst call of each size in the first pass (new to the session) / later passes' median, {args.clock} ms:")
    for label in models:
        c = costs[label]
        firsts = [
            f"t({n}) {c[f'first pass first({n})'][0]:.1f} / {statistics.median(c[f't({n})']):.1f}" for n in POSITIONS
        ]
        prefill = f"prefill {c['first pass prefill'][0]:.0f} / {statistics.median(c['prefill']):.0f}"
        print(f"  {label}: {', '.join(firsts)}, {prefill}")


if __name__ == "__main__":
    main()
