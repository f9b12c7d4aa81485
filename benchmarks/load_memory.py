"""Resident memory of a loaded package, and where it comes from: the graph's files (mapped external data
counts as file-backed RSS), the KV buffers allocated at max_length, and the rest (ORT's prepacked weights,
arenas), with the decode time per token t(1) (and the CPU time per token, steadier on a loaded machine) so a
memory cut can be checked not to slow decoding, and with `--steps N` the cost t(n) of one target call over
n = 1..N new positions after `--context` cached ones (the calibration's timing, as benchmarks/step_costs.py
reports it).

    python benchmarks/load_memory.py PACKAGE [--max-length 2048] [--threads 2] [--tokens 64] [--steps 8]

Each load runs in a child process (its RSS is its own). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path

def status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}

import ortspec
from ortspec.runtime.model import session

entries = json.loads(sys.argv[5])  # extra session config entries, to compare (empty: the package's own)
plain, arena = session.session_options, entries.pop("enable_cpu_mem_arena", None)

def options(*args, **kwargs):
    chosen = plain(*args, **kwargs)
    for key, value in entries.items():
        chosen.add_session_config_entry(key, value)
    if arena is not None:
        chosen.enable_cpu_mem_arena = arena == "1"
    return chosen

session.session_options = options
before = status()
start = time.perf_counter()
pipe = ortspec.load(sys.argv[1], threads=int(sys.argv[2]), max_length=int(sys.argv[3]), verify=False)
load_s = time.perf_counter() - start
loaded = status()
prompt = [5 + i % 300 for i in range(32)]
pipe.generate(prompt, max_new_tokens=8, use_draft=False)  # warm up
steps, cpu = [], []
for _ in range(3):
    cpu_start = time.process_time()
    r = pipe.generate(prompt, max_new_tokens=int(sys.argv[4]), use_draft=False).stats
    steps.append((r.seconds - r.time_to_first_token) / max(1, r.new_tokens - 1))
    cpu.append((time.process_time() - cpu_start) / r.new_tokens)  # this process's CPU per token, prefill too
steps_n, context = int(sys.argv[6]), int(sys.argv[7])
t_ms = []
if steps_n:
    from ortspec.runtime.speculation.calibration import measure
    t_ms = measure(pipe.target, None, "load", steps_n - 1, [context], repeats=7).target_ms[0]
kv = pipe.target.cache_bytes() + (pipe.draft.cache_bytes() if pipe.draft is not None else 0)
print(json.dumps({"before": before, "loaded": loaded, "decoded": status(), "load_s": load_s,
                  "t1_ms": 1000 * min(steps), "cpu_per_token_ms": 1000 * min(cpu), "t_ms": t_ms,
                  "new_tokens": r.new_tokens, "kv_bytes": kv}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--config", nargs="*", default=[], help="KEY=VALUE session config entries to try (enable_cpu_mem_arena=0 too)"
    )
    parser.add_argument("--steps", type=int, default=0, help="also time target calls over 1..N new positions")
    parser.add_argument("--context", type=int, default=128, help="cached positions before those calls")
    args = parser.parse_args()
    print(
        json.dumps(
            load_memory(args.package, args.threads, args.max_length, args.tokens, args.config, args.steps, args.context)
        )
    )


def load_memory(
    package: Path,
    threads: int = 2,
    max_length: int = 2048,
    tokens: int = 64,
    config: list[str] | None = None,
    steps: int = 0,
    context: int = 128,
) -> dict:
    """The measures of one load of `package` in a child process (main's JSON line, as a dict)."""
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(package),
        str(threads),
        str(max_length),
        str(tokens),
        json.dumps(dict(entry.split("=", 1) for entry in config or [])),
        str(steps),
        str(context),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((package / "manifest.json").read_text())
    result["package_bytes"] = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    result["manifest_target"] = {k: manifest["target"].get(k) for k in ("onnx", "dtype") if k in manifest["target"]}
    return result


if __name__ == "__main__":
    main()
