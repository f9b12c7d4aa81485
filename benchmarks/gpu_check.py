"""The CUDA execution provider on a GPU, in one prepared run: parity, exactness, t(n), speedup, copies.

    python benchmarks/gpu_check.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/gpu --out gpu_check.json

needs onnxruntime-gpu (CUDA 13 build for 1.31) and a GPU. Without --gguf it checks a random ~130M Llama
(benchmarks/common.py's `bench` preset; making it needs torch and transformers), which has no draft.
Steps, each recorded in --out as it finishes:
1. export with the builder: the target in fp16 (unquantized, and int4 with --int4), the shipped
   SmolLM2 draft head in fp32 (to run on the CPU) and in fp16 (on the GPU), and an fp32 reference;
2. parity: the CUDA fp16 logits of a chat prompt plus its answer, teacher-forced, against the CPU's fp32
   logits: mean |Δ| ≤ 1% of the logits' spread and top-1 agreement ≥ 97% pass;
3. t(n) for n = 1..16 new positions at context 256 (median of repeated calls, logits copied to the host);
4. plain vs speculative (greedy, compare_modes: outputs must match up to near-ties) with suffix and
   n-gram drafting and the head, on the CPU and on the GPU, on edit-style and open chats;
5. a profile of decode steps: every Memcpy node the CUDA session runs and the bytes it moves, so that
   a copy of the KV cache would show (it must not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
HEAD = Path(__file__).parents[1] / "ortspec" / "models" / "heads" / "smollm2"


class Results:
    """The figures so far, rewritten to --out after each step (a crash keeps what was measured)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def step(self, name: str, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            value = run()
            self.data[name] = value
            print(json.dumps(value, indent=1, default=str)[:4000], flush=True)
        except Exception as exc:
            value = None
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            print(self.data[name]["trace"], flush=True)
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        return value


def load_cuda_libraries() -> None:
    """onnxruntime-gpu dlopens cuBLAS/cuDNN/cudart: take them from the nvidia-* wheels torch brought."""
    import onnxruntime as ort

    with contextlib.suppress(ImportError):
        import torch  # noqa: F401 - loads the CUDA libraries its wheels carry
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def machine(providers: list[str]) -> dict[str, Any]:
    import onnxruntime as ort

    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return {
        "onnxruntime": ort.__version__,
        "available": ort.get_available_providers(),
        "asked": providers,
        "gpu": smi.stdout.strip() or smi.stderr.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def export(args: argparse.Namespace) -> dict[str, Path]:
    from ortspec.export import export_pair

    quiet = lambda _: None  # noqa: E731
    source = args.gguf
    head = HEAD if args.gguf is not None else None
    if source is None:
        from common import bench_checkpoints

        source = bench_checkpoints(args.work / "random")[0]
    made = {}
    plans = {
        "fp32-cpu": dict(quantize="none", dtype="fp32"),
        "fp16": dict(quantize="none", dtype="fp16", draft=head, draft_dtype="fp32"),
        "fp16-gpu-head": dict(quantize="none", dtype="fp16", draft=head, draft_dtype="fp16"),
    }
    if args.quick:
        plans = {"fp16": plans["fp16"]}
    if args.int4 and not args.quick:
        plans["int4-fp16"] = dict(quantize="int4", dtype="fp16", draft=head, draft_dtype="fp32", draft_quantize="none")
    for name, options in plans.items():
        if head is None and name == "fp16-gpu-head":
            continue
        out = args.work / name
        if not (out / "manifest.json").exists():
            start = time.perf_counter()
            export_pair(source, out, force=True, report=quiet, **options)
            print(f"exported {name} in {time.perf_counter() - start:.1f} s", flush=True)
        made[name] = out
    return made


def chat_ids(pipe: Any, text: str) -> list[int]:
    return pipe.chat_prompt([{"role": "user", "content": text}])


def parity(packages: dict[str, Path], providers: list[str]) -> dict[str, Any]:
    import ortspec
    from ortspec.runtime.model.decoder import DecoderState

    from free_drafting import CHAT, EDIT

    reference = ortspec.load(packages["fp32-cpu"], providers=CPU)
    gpu = ortspec.load(packages["fp16"], providers=providers)
    rows = []
    for text in (EDIT[0], CHAT[0]):
        prompt = chat_ids(reference, text)
        answer = reference.generate(prompt, max_new_tokens=64, use_draft=False).token_ids
        tokens = [*prompt, *answer]
        want = DecoderState(reference.target).forward(tokens)
        got = DecoderState(gpu.target).forward(tokens)
        gap = np.abs(want - got)
        rows.append(
            dict(
                positions=len(tokens),
                max_abs=float(gap.max()),
                mean_abs=float(gap.mean()),
                spread=float(want.std()),
                top1_agreement=float((want.argmax(-1) == got.argmax(-1)).mean()),
            )
        )
    passed = all(r["mean_abs"] <= 0.01 * r["spread"] and r["top1_agreement"] >= 0.97 for r in rows)
    return {"rows": rows, "tolerance": "mean |Δ| ≤ 0.01·spread and top-1 ≥ 0.97", "passed": passed}


def step_times(
    package: Path, providers: list[str], cuda_graphs: bool, context: int = 256, repeats: int = 60
) -> dict[str, Any]:
    import ortspec
    from ortspec.runtime.model.decoder import DecoderState

    pipe = ortspec.load(package, providers=providers, cuda_graphs=cuda_graphs)
    state = DecoderState(pipe.target)
    rng = np.random.default_rng(0)
    history = rng.integers(100, 5000, context).tolist()
    state.forward(history)
    times = {}
    for n in range(1, 17):
        tokens = rng.integers(100, 5000, n).tolist()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            state.forward(tokens)
            samples.append(time.perf_counter() - start)
            state.truncate(context)
        times[n] = round(statistics.median(samples[5:]) * 1000, 3)
    return {
        "providers": pipe.target.providers,
        "cuda_graphs": pipe.target.cuda_graphs,
        "context": context,
        "t_ms": times,
        "t8_over_t1": round(times[8] / times[1], 3),
        "target_t8_le_1.2_t1": times[8] <= 1.2 * times[1],
    }


MODES = {
    "suffix auto": dict(draft="suffix"),
    "ngram auto": dict(draft="ngram"),
    "head auto": dict(draft="model"),
    "head γ=3": dict(draft="model", draft_tokens=3),
    "head γ=5": dict(draft="model", draft_tokens=5),
}


def graph_parity(package: Path, providers: list[str]) -> dict[str, Any]:
    """Logits of CUDA-graph replays against ordinary calls, for each call size, at moving positions."""
    import ortspec
    from ortspec.runtime.model.decoder import DecoderState

    states = [DecoderState(ortspec.load(package, providers=providers, cuda_graphs=g).target) for g in (False, True)]
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 5000, 200).tolist()
    for state in states:
        state.forward(prompt)
    worst, calls, length = 0.0, 0, 200
    for n in (1, 2, 4, 8, 1, 3, 16, 1):
        for _ in range(5):  # the third call of a size is captured; the later ones replay
            tokens = rng.integers(100, 5000, n).tolist()
            want, got = (state.forward(tokens) for state in states)
            worst, calls = max(worst, float(np.abs(want - got).max())), calls + 1
            length += n - int(rng.integers(0, n + 1))  # keep a random part, as verification does
            for state in states:
                state.truncate(length)
    return {"calls": calls, "max_abs_diff": worst, "graphed": states[1].model.cuda_graphs, "passed": worst == 0.0}


def speedups(
    package: Path, providers: list[str], draft_providers: list[str], args: argparse.Namespace, cuda_graphs: bool
) -> dict:
    import ortspec
    from ortspec.runtime.bench import MAX_NEAR_TIE

    from free_drafting import CHAT, EDIT, WARMUP, measure_chat_sets

    pipe = ortspec.load(package, providers=providers, draft_providers=draft_providers, cuda_graphs=cuda_graphs)
    modes = {k: v for k, v in MODES.items() if pipe.draft is not None or v["draft"] != "model"}
    new, repeats, count = args.new, args.repeats, args.prompts
    sets = {"edit": [chat_ids(pipe, p) for p in EDIT[:count]], "chat": [chat_ids(pipe, p) for p in CHAT[:count]]}
    warmup = [chat_ids(pipe, p) for p in WARMUP[: max(1, count * 3 // 4)]]
    noise, measured = measure_chat_sets(pipe, sets, warmup, modes, new, repeats)
    out: dict[str, Any] = {
        "providers": pipe.target.providers,
        "draft_providers": pipe.draft.providers if pipe.draft else None,
        "cuda_graphs": pipe.target.cuda_graphs,
        "path_noise": noise,
        "path_noise_ok": noise <= MAX_NEAR_TIE,  # larger: a kernel path is broken
    }
    for name, reports in measured.items():
        out[name] = {
            mode: dict(
                alpha=r.speculative.alpha,
                tokens_per_call=round(r.tokens_per_target_call, 2),
                plain_tok_s=round(r.plain.tokens_per_second, 1),
                spec_tok_s=round(r.speculative.tokens_per_second, 1),
                decode_speedup=round(r.decode_speedup, 3),
                near_tie=r.near_tie,
                mismatches=[asdict(d) for d in r.mismatches],
                near_ties=[asdict(d) for d in r.near_ties],
            )
            for mode, r in reports.items()
        }
    return out


def copies(package: Path, providers: list[str], work: Path, steps: int = 8) -> dict[str, Any]:
    """Profile `steps` one-token decode calls and a 4-token verify: every Memcpy node and its bytes."""
    import onnxruntime as ort

    from ortspec.runtime.model.decoder import DecoderState
    from ortspec.runtime.model.onnx_model import Model
    from ortspec.runtime.model.session import session_options
    from ortspec.runtime.package.manifest import load_manifest

    manifest = load_manifest(package)
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "profile")
    options.optimized_model_filepath = str(work / "optimized.onnx")
    session = ort.InferenceSession(str(manifest.root / manifest.target.onnx), options, providers=providers)
    model = Model(manifest.target, session, max_length=1024)
    state = DecoderState(model)
    state.forward(list(range(100, 164)))
    for token in range(steps):
        state.forward([200 + token])
    state.forward([300, 301, 302, 303])
    trace = json.loads(Path(session.end_profiling()).read_text())
    node_events = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    memcpy = [e for e in node_events if "Memcpy" in e["args"].get("op_name", "")]
    on_cpu = sorted({e["args"]["op_name"] for e in node_events if e["args"].get("provider") == "CPUExecutionProvider"})
    cache_bytes = 2 * manifest.target.num_kv_heads * 1024 * manifest.target.head_dim  # one layer's K, fp16
    optimized = __import__("onnx").load(str(work / "optimized.onnx"), load_external_data=False)
    graph_copies = [
        {"op": n.op_type, "inputs": list(n.input)} for n in optimized.graph.node if n.op_type.startswith("Memcpy")
    ]
    sizes = [int(e["args"].get("output_size", 0)) for e in memcpy]
    return {
        "calls_profiled": steps + 2,
        "memcpy_nodes_run": len(memcpy),
        "memcpy_bytes_total": sum(sizes),
        "largest_memcpy_bytes": max(sizes, default=0),
        "one_layer_kv_bytes": cache_bytes,
        "memcpy_nodes_in_graph": graph_copies,
        "ops_on_cpu": on_cpu,
        "kv_copied": any(s >= cache_bytes // 4 for s in sizes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF (default: a random ~130M Llama)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-gpu-check"))
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--providers", nargs="+", default=CUDA, help="default: CUDA, then CPU")
    parser.add_argument("--new", type=int, default=96, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="edit and chat prompts each (at most 8)")
    parser.add_argument("--int4", action="store_true", help="also export and time an int4 fp16 target")
    parser.add_argument("--quick", action="store_true", help="only the fp16 package: graphs' parity, t(n), speed")
    parser.add_argument("--both", action="store_true", help="speed with and without CUDA graphs (default: with)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if "CUDAExecutionProvider" in args.providers:
        load_cuda_libraries()
    os.environ.setdefault("ORTSPEC_CACHE", str(args.work / "cache"))
    results = Results(args.out)
    results.step("machine", lambda: machine(args.providers))
    packages = results.step("export", lambda: export(args))
    if not packages:
        return
    if not args.quick:
        results.step("parity", lambda: parity(packages, args.providers))
        results.step("copies", lambda: copies(packages["fp16"], args.providers, args.work))
    fp16, cpu_head, gpu_head = packages["fp16"], CPU, args.providers
    results.step("cuda graph parity", lambda: graph_parity(fp16, args.providers))
    if not args.quick:
        results.step("t(n) fp16", lambda: step_times(fp16, args.providers, cuda_graphs=False))
    results.step("t(n) fp16, cuda graphs", lambda: step_times(fp16, args.providers, cuda_graphs=True))
    for graphs in (True, False) if args.both else (True,):
        label = ", cuda graphs" if graphs else ""
        results.step(f"speed, head on CPU{label}", lambda g=graphs: speedups(fp16, args.providers, cpu_head, args, g))
        if "fp16-gpu-head" in packages:
            results.step(
                f"speed, head on GPU{label}",
                lambda g=graphs: speedups(packages["fp16-gpu-head"], args.providers, gpu_head, args, g),
            )
    if "int4-fp16" in packages:
        for graphs in (False, True):
            label = ", cuda graphs" if graphs else ""
            results.step(f"t(n) int4{label}", lambda g=graphs: step_times(packages["int4-fp16"], args.providers, g))
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
