"""The default pair on held-out stdlib code: acceptance, speed, speedup, and efficiency vs the model.

For fp32, int8 and int4 packages of the shipped pair and each drafting mode, greedy decoding of the
first lines of every held-out stdlib file (never seen in training), plain and speculative runs
alternating in one process. Prints α (per judged draft), tokens per target call, decode tokens/s of
both, the measured decode speedup, the speedup predicted from α, γ and the calibrated round time
r(γ) (c and v(γ+1) shown for reference), and the efficiency = measured / predicted.

    python benchmarks/default_pair.py [--work /tmp/ortspec-default-bench] [--lines 12] [--new 96]
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import ortspec
from ortspec.models.default_pair import shipped_pair
from ortspec.models.train_default import HELDOUT
from ortspec.runtime.bench import compare
from ortspec.runtime.speculation.calibration import tokens_per_round

MODES = {
    "γ=4": dict(draft="model", draft_tokens=4),
    "adaptive": dict(draft="model", draft_tokens="adaptive"),
    "auto": dict(draft="model", draft_tokens="auto"),
    "hybrid auto": dict(draft="hybrid", draft_tokens="auto"),
    "ngram γ=4": dict(draft="ngram", draft_tokens=4),
    "ngram auto": dict(draft="ngram", draft_tokens="auto"),
}


def heldout_prompts(lines: int) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return ["".join((lib / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]) for name in HELDOUT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-default-bench"))
    parser.add_argument("--lines", type=int, default=12)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    args = parser.parse_args()
    from ortspec.export import export_pair

    target, draft = shipped_pair()
    prompts = heldout_prompts(args.lines)
    print(f"{len(prompts)} held-out prompts (first {args.lines} lines), {args.new} new tokens, greedy")
    print(
        f"{'weights':<7}{'mode':<11}{'α':>6}{'tok/call':>9}{'plain t/s':>10}{'spec t/s':>10}"
        f"{'speedup':>9}{'predicted':>10}{'effic.':>8}{'c':>7}{'v(γ+1)':>8}{'ties':>6}"
    )
    for quantize in args.quantize:
        out = args.work / f"default-{quantize}"
        if not (out / "manifest.json").exists():
            export_pair(target, out, draft=draft, quantize=quantize, force=True, report=lambda _: None)
        pipe = ortspec.load(out, threads=args.threads, verify=False)
        calibration = pipe.calibration(remeasure=True)
        context = calibration.contexts[min(1, len(calibration.contexts) - 1)]
        for mode, options in MODES.items():
            report = compare(pipe, prompts, max_new_tokens=args.new, repeats=args.repeats, **options)
            spec = report.speculative
            alpha = spec.alpha or 0.0
            rounds = max(1, spec.target_calls - report.runs)  # verify calls
            drafted_rounds = max(1, rounds - spec.undrafted_rounds)
            g = max(1, round(spec.drafted / drafted_rounds))  # mean γ of the rounds that drafted
            share = (rounds - spec.undrafted_rounds) / rounds if spec.drafted else 0.0
            t1, r = calibration.round(0, context), calibration.round(g, context, options.get("draft") != "ngram")
            c = calibration.draft(context) / t1
            v = calibration.target(g + 1, context) / t1
            # predicted from the calibrated whole-round time r(γ), plain rounds mixed in at their share
            tokens = share * tokens_per_round(alpha, g) + (1 - share)
            predicted = tokens / (share * r + (1 - share) * t1) * t1
            print(
                f"{quantize:<7}{mode:<11}{alpha:>6.2f}{report.tokens_per_target_call:>9.2f}"
                f"{(report.plain.new_tokens - report.runs) / report.plain.decode_seconds:>10.0f}"
                f"{(spec.new_tokens - report.runs) / spec.decode_seconds:>10.0f}"
                f"{report.decode_speedup:>9.2f}{predicted:>10.2f}{report.decode_speedup / predicted:>8.2f}"
                f"{c:>7.3f}{v:>8.2f}{len(report.near_ties):>6}"
                + ("" if not report.mismatches else "  OUTPUT MISMATCH BEYOND A NEAR-TIE")
            )


if __name__ == "__main__":
    main()
