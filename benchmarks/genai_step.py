"""ms per decode step: ortspec's runtime vs onnxruntime-genai's own Generator, same checkpoint, int4.

onnxruntime-genai's model builder needs transformers 5.x while our exporter env pins <4.58, so the
script creates a separate venv for it (`--genai-venv`, created on first use with pip), builds the
genai model there from the same random-weight ~130M Llama checkpoint, and times both runtimes on
the same prompt in one run (genai in a subprocess of its venv, alternating with ours).

    python benchmarks/genai_step.py [--work /tmp/ortspec-bench] [--genai-venv /tmp/genai-venv] [--context 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ortspec
from ortspec.runtime.model.decoder import DecoderState

from common import bench_checkpoints, exported

GENAI_TIMER = r"""
import json, sys, time, statistics
import onnxruntime_genai as og
model_dir, context, steps, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = og.Model(model_dir)
ids = [(7 * i) % 1000 + 10 for i in range(context)]
per_step = []
for _ in range(rounds):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    start = time.perf_counter()
    for _ in range(steps - 1):
        generator.generate_next_token()
    per_step.append((time.perf_counter() - start) * 1000 / (steps - 1))
print(json.dumps(per_step))
"""


def ensure_genai_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "onnxruntime-genai", "transformers>=5", "onnx", "onnx-ir"],
            check=True,
        )
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-bench"))
    parser.add_argument("--genai-venv", type=Path, default=Path("/tmp/genai-venv"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    target, _ = bench_checkpoints(args.work)
    ours = exported(args.work / "builder-int4", target, quantize="int4", exporter="builder")
    python = ensure_genai_venv(args.genai_venv)
    genai_dir = args.work / "genai-int4"
    if not (genai_dir / "genai_config.json").exists():
        subprocess.run(
            [
                str(python),
                "-m",
                "onnxruntime_genai.models.builder",
                "-m",
                str(target),
                "-i",
                str(target),
                "-o",
                str(genai_dir),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(args.work / "genai-cache"),
            ],
            check=True,
            capture_output=True,
        )
    pipe = ortspec.load(ours, verify=False)
    ids = [(7 * i) % 1000 + 10 for i in range(args.context)]
    ours_ms, genai_ms = [], []
    target = DecoderState(pipe.target)
    for _ in range(args.rounds):  # alternate the two runtimes
        target.reset()
        target.forward(ids)
        token = ids[-1]
        start = time.perf_counter()
        for _ in range(args.steps - 1):
            token = int(target.forward([token])[-1].argmax())
        ours_ms.append((time.perf_counter() - start) * 1000 / (args.steps - 1))
        out = subprocess.run(
            [str(python), "-c", GENAI_TIMER, str(genai_dir), str(args.context), str(args.steps), "1"],
            check=True,
            capture_output=True,
            text=True,
        )
        genai_ms += json.loads(out.stdout.strip().splitlines()[-1])
    ours_median, genai_median = statistics.median(ours_ms), statistics.median(genai_ms)
    print(f"int4 ~130M Llama, context {args.context}, {args.steps - 1} greedy steps, median of {args.rounds} rounds")
    print(f"ortspec runtime (builder package, IO binding): {ours_median:.2f} ms/step  {ours_ms}")
    print(f"onnxruntime-genai Generator:                   {genai_median:.2f} ms/step  {genai_ms}")
    print(f"ratio ortspec / genai = {ours_median / genai_median:.2f}")


if __name__ == "__main__":
    main()
