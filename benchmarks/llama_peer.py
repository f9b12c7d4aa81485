"""llama.cpp as the peer of the export benchmarks: its converter, llama-quantize and llama-bench, each in a
child process under `/usr/bin/time -v` (peak RSS, wall and CPU time of the child alone).

The build comes from benchmarks/build_llama_cpp.sh: DIR is its llama.cpp tree (binaries in DIR/build/bin),
and the converter runs in the venv beside it (DIR/../llamaenv) unless `python` says otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timed:
    """One child process: wall seconds, CPU seconds (user + system), peak RSS in GB, its stdout."""

    seconds: float
    cpu_s: float
    rss_gb: float
    stdout: str

    def __add__(self, other: Timed) -> Timed:
        """Two steps run one after the other: times add up, the peak is the larger one."""
        return Timed(
            self.seconds + other.seconds, self.cpu_s + other.cpu_s, max(self.rss_gb, other.rss_gb), other.stdout
        )


def timed(command: list[str], address_space: int | None = None) -> Timed:
    """Run `command` under /usr/bin/time -v (and prlimit --as when given); raise with its output if it fails."""
    prefix = ["prlimit", f"--as={address_space}"] if address_space else []
    start = time.perf_counter()
    done = subprocess.run([*prefix, "/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")

    def field(name: str) -> float:
        found = re.search(rf"{re.escape(name)}: ([\d.]+)", done.stderr)
        return float(found.group(1)) if found else float("nan")

    cpu = field("User time (seconds)") + field("System time (seconds)")
    return Timed(seconds, cpu, field("Maximum resident set size (kbytes)") / 1e6, done.stdout)


class LlamaCpp:
    """A llama.cpp build: convert an HF checkpoint, quantize a GGUF, time forward passes with llama-bench."""

    def __init__(self, root: Path, python: Path | None = None) -> None:
        self.root = Path(root)
        self.bin = self.root / "build" / "bin"
        self.python = python or self.root.parent / "llamaenv" / "bin" / "python"
        missing = [p for p in (self.bin / "llama-quantize", self.bin / "llama-bench", self.python) if not p.exists()]
        if missing:
            raise SystemExit(f"no llama.cpp build at {root} (missing {missing[0]}): run benchmarks/build_llama_cpp.sh")

    def convert(self, checkpoint: Path, out: Path, outtype: str = "f16", address_space: int | None = None) -> Timed:
        """convert_hf_to_gguf.py: the checkpoint as one GGUF file of `outtype` (f32, f16, bf16, q8_0)."""
        script = self.root / "convert_hf_to_gguf.py"
        command = [str(self.python), str(script), str(checkpoint), "--outtype", outtype, "--outfile", str(out)]
        return timed(command, address_space)

    def quantize(self, source: Path, out: Path, kind: str, threads: int = 2, address_space: int | None = None) -> Timed:
        """llama-quantize with its default tensor mix for `kind` (Q4_0, Q4_1, Q8_0, Q4_K_M, ...)."""
        return timed([str(self.bin / "llama-quantize"), str(source), str(out), kind, str(threads)], address_space)

    def step_ms(self, gguf: Path, ns: list[int], context: int, threads: int = 2, repeats: int = 3) -> dict[int, float]:
        """t(n): milliseconds of one forward pass over n new positions after `context` cached ones
        (llama-bench's prompt test of n tokens at depth `context`, mean of `repeats`)."""
        command = [
            str(self.bin / "llama-bench"),
            "-m", str(gguf),
            "-p", ",".join(map(str, ns)),
            "-n", "0",
            "-d", str(context),
            "-t", str(threads),
            "-r", str(repeats),
            "-o", "json",
        ]  # fmt: skip
        rows = json.loads(timed(command).stdout)
        return {int(row["n_prompt"]): row["avg_ns"] / 1e6 for row in rows if row["n_prompt"] in ns}
