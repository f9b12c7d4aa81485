"""Prefill against OpenVINO GenAI on the same GGUF: tokens/s of reading a fresh prompt and giving the first token.

OpenVINO GenAI's `LLMPipeline` reads a GGUF file directly (its own weights and kernels); ortspec reads its
export of the same file. Both get the same fresh prompts (token ids, a new one each repeat, so no prefix
cache helps: ortspec loads with `prefix_cache=False`), generate one token, on the same thread count,
timed in turns in one run, in wall time and in the process's CPU time (pool threads that spin count as
busy: compare CPU time at `--threads 1`). OpenVINO runs in a subprocess of its own venv (`--openvino-venv`, made with
`pip install openvino-genai` on first use).

    python benchmarks/openvino_prefill.py MODEL.gguf PACKAGE [PACKAGE ...] --tokens 500 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    """A fresh prompt of `length` token ids (any will do for a timing), different for each seed."""
    return [(7919 * (i + 1) + 104729 * seed) % vocab for i in range(length)]


def worker(gguf: str, threads: int) -> None:
    """Run in the OpenVINO venv: per stdin line `LENGTH SEED VOCAB`, the seconds of a one-token generation."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    pipe = og.LLMPipeline(gguf, "CPU", INFERENCE_NUM_THREADS=threads)
    config = og.GenerationConfig()
    config.max_new_tokens = 1
    print(json.dumps({"ready": f"openvino {ov.__version__}, openvino-genai {og.__version__}"}), flush=True)
    for line in sys.stdin:
        length, seed, vocab = (int(x) for x in line.split())
        ids = np.array([prompt_ids(length, seed, vocab)], dtype=np.int64)
        inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        start, cpu = time.perf_counter(), time.process_time()
        pipe.generate(inputs, config)
        print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}), flush=True)


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "openvino-genai"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("packages", type=Path, nargs="+", help="ortspec exports of the GGUF")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--openvino-venv", type=Path, default=Path("/work/tools/openvino-venv"))
    args = parser.parse_args()

    import numpy as np

    import ortspec

    from common import load_average

    pipes = {p.name: ortspec.load(p, threads=args.threads, verify=False, prefix_cache=False) for p in args.packages}
    vocab = min(pipe.target.vocab_size for pipe in pipes.values())
    python = ensure_venv(args.openvino_venv)
    process = subprocess.Popen(
        [str(python), __file__, "--worker", str(args.gguf), str(args.threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert process.stdin is not None and process.stdout is not None

    def openvino(seed: int) -> tuple[float, float]:
        process.stdin.write(f"{args.tokens} {seed} {vocab}\n")  # type: ignore[union-attr]
        answer = json.loads(process.stdout.readline())  # type: ignore[union-attr]
        return float(answer["seconds"]), float(answer["cpu"])

    def ours(name: str, seed: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        pipes[name].generate(prompt_ids(args.tokens, seed, vocab), max_new_tokens=1, use_draft=False)
        return time.perf_counter() - start, time.process_time() - cpu

    print(json.loads(process.stdout.readline())["ready"])
    print(f"prompt {args.tokens} fresh tokens, 1 new, threads {args.threads}; load average {load_average()}")
    engines = {"OpenVINO GenAI (the GGUF)": openvino} | {
        f"ortspec {name}": (lambda seed, n=name: ours(n, seed)) for name in pipes
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for seed in range(args.repeats + 1):  # seed 0 warms up
        for name, run in engines.items():
            elapsed = run(seed)
            if seed:
                samples[name].append(elapsed)
    process.stdin.close()
    process.wait(timeout=60)
    print(f"load average after: {load_average()}")
    print(
        f"| engine | prefill {args.tokens}, wall: tokens/s, median (range) | vs OpenVINO | CPU-time tokens/s "
        "(the process's CPU seconds) | vs OpenVINO |"
    )
    print("|---|---|---|---|---|")
    reference = samples["OpenVINO GenAI (the GGUF)"]
    for name, values in samples.items():
        row = f"| {name} "
        for clock in (0, 1):  # wall, CPU
            rates = [args.tokens / v[clock] for v in values]
            ratio = float(np.median([r[clock] / v[clock] for r, v in zip(reference, values, strict=True)]))
            row += f"| {np.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | {ratio:.2f}x "
        print(row + "|")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
