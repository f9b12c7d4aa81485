"""Decode-step cost of the newer families: the builder's graph vs optimum's export, at one context length.

For each family, a random-weight ~100M checkpoint of the `bench` preset's width that uses the
family's features (gemma3_text: head_dim 256, q/k norms, 5 sliding layers per global one, a 512
window; phi3: partial rotary 0.75 and longrope, whose switch at 4096 positions lies past the
measured context), exported int4 both ways; prints the median ms per step over alternating
rounds, and the builder/optimum ratio.

    python benchmarks/families.py [--work /tmp/ortspec-families] [--context 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import ortspec
from ortspec.models.random import PRESETS, make_checkpoint

from common import exported
from kv_layouts import step_ms

WIDTH = {k: v for k, v in PRESETS["bench"][0].items() if k not in ("heads", "kv_heads")}  # hidden 768, 12 layers
FAMILIES: dict[str, dict] = {
    "gemma3_text": dict(
        heads=4, kv_heads=1, head_dim=256, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256
    ),
    "phi3": dict(
        heads=12,
        kv_heads=4,
        partial_rotary_factor=0.75,  # 48 of 64 dims rotate: 24 factors
        original_max_position_embeddings=4096,
        max_positions=131072,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 24, "long_factor": [1.0 + i for i in range(24)]},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-families"))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"ms per decode step at context {args.context} ({args.quantize}, threads {args.threads or 'default'})")
    for family in args.families:
        checkpoint = args.work / family / "checkpoint"
        if not (checkpoint / "config.json").exists():
            make_checkpoint(checkpoint, family, **{**WIDTH, **FAMILIES[family]})
        pipes = {}
        for exporter in ("builder", "optimum"):
            out = args.work / family / f"{exporter}-{args.quantize}"
            try:
                package = exported(out, checkpoint, quantize=args.quantize, exporter=exporter, report=lambda _: None)
            except Exception as exc:  # report why an exporter cannot handle the family, and go on
                print(f"{family:<12} {exporter:<8} export failed: {type(exc).__name__}: {exc}")
                continue
            pipes[exporter] = ortspec.load(package, threads=args.threads, verify=False)
        times: dict[str, list[float]] = {exporter: [] for exporter in pipes}
        for _ in range(args.rounds):  # alternate, so load from elsewhere hits both alike
            for exporter, pipe in pipes.items():
                times[exporter].append(step_ms(pipe.target, args.context))
        for exporter, pipe in pipes.items():
            layout = pipe.manifest.target.kv_layout
            print(f"{family:<12} {exporter:<8} {layout:<14} {statistics.median(times[exporter]):8.2f} ms")
        if len(times) == 2:
            ratio = statistics.median(times["builder"]) / statistics.median(times["optimum"])
            print(f"{family:<12} builder / optimum: {ratio:.2f}")


if __name__ == "__main__":
    main()
