"""Continuous batching under load: `ortspec serve` (a subprocess on 127.0.0.1), 1 client vs 4, and the
time to first token of a new request while 3 others decode; optionally the same against llama.cpp's
`llama-server -np 4` and OpenVINO GenAI's continuous batching on the same GGUF and prompts.

    python benchmarks/serve_batching.py PACKAGE [--threads 2] [--max-tokens 96] [--unbatched]
        [--drafting [--draft KIND]] [--chats] [--tree NAME=DIR ...] [--repeat N] [--no-ttft]
        [--llama-server BIN] [--openvino PRECISION ...] [--gguf FILE]

PACKAGE: a package whose target this ortspec's builder made (e.g. `ortspec export
SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-int4`, with `--draft` a head for it: the catalog's
`smollm2`). Each server runs with --parallel 4 and --threads T. Phases, all greedy, without drafting:
- "1 client": the prompts one after another; "4 clients": the same prompts, 4 at a time. Aggregate
  tokens/s = completion tokens / wall time (the same requests, so the same tokens, in both).
- TTFT: the median time to the first streamed token of a request alone ("idle"), and while 3 clients
  keep decoding long requests ("3 busy").
Ratios are of numbers measured in the same run; "same text" counts the prompts whose greedy text with
4 clients equals the one with 1 client. `--unbatched` adds a row for `ortspec serve --no-batch`.
With `--drafting` (the server's default drafter, or `--draft KIND`, with auto γ), on each server:
1 client without drafting (draft=none), 1 client drafting, 4 clients without, 4 drafting, and
the load average as the phases start; "draft vs none" compares two phases of one run. A drafter that
uses suffix matches (the default: hybrid; suffix) remembers the 1-client phase in the 4-client one
(the same prompts): that 4 vs 1 is not a fair one; `--draft model` (the package's head or draft LM alone) has none.
`--chats`: chat requests (/v1/chat/completions) of CHATS instead of completions of PROMPTS.
`--tree NAME=DIR` (repeatable) runs the servers from the ortspec source tree DIR (on PYTHONPATH) as
arm NAME, `--repeat` times, the arms alternating: before/after comparisons under the same load.
`--openvino PRECISION` (repeatable: default, bf16, f32; the CPU plugin's inference precision hint) adds
an arm of OpenVINO GenAI's ContinuousBatchingPipeline on the GGUF, in its own venv (`--openvino-venv`,
made on first use), with INFERENCE_NUM_THREADS = --threads: the same prompts as the token ids the server
makes of them (its tokenizer and chat template), greedy, 1 request in flight, then 4 (each next added as
one finishes), after the servers of each round, never beside them. At the end, a table of every
engine's 1 vs 4 (wall clock and per CPU second of the engine's process), and of ortspec against each
peer in the same round. The peer runs in process, without HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

import ortspec
from ortspec.runtime.bench import NEAR_TIE, divergence_gap

from openvino_prefill import ensure_venv
from peer_runners import VenvWorker

PROMPTS = [
    "def fibonacci(n):\n",
    "The history of the Roman Empire began",
    "class Stack:\n    def __init__(self):\n",
    "Here is a recipe for a chocolate cake. Ingredients:",
    "import os\nimport sys\n\n\ndef main():\n",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
    "SELECT name, email FROM users WHERE",
]
CHATS = [  # not among the head's training chats: everyday questions answered in prose or code
    "Explain how a refrigerator keeps food cold.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are three tips for sleeping better?",
    "Describe the water cycle for a ten-year-old.",
    "Give me a short plan for learning to play the guitar.",
    "Why do leaves change colour in autumn?",
    "Write a polite email asking a colleague to review my report by Friday.",
    "What is the difference between a list and a tuple in Python?",
]
TTFT_PROMPT = (
    "You are a helpful assistant. Summarise the following notes in three sentences. Notes: the meeting "
    "covered the release schedule, the open bugs in the parser, the new hire starting on Monday, the "
    "budget for the conference trip and the migration of the build servers to the new data centre. "
    "Summary:"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def stream_completion(url: str, prompt: str, max_tokens: int, extra: dict) -> tuple[float, int, str]:
    """(seconds to the first token, completion tokens, text) of one greedy streamed completion (with
    extra["chat"]: of the prompt as a user message, through /v1/chat/completions)."""
    extra = dict(extra)
    route = "chat/completions" if extra.pop("chat", False) else "completions"
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    body["stream_options"] = {"include_usage": True}
    if route == "completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    text = ""
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            choices = data.get("choices", [])
            delta = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
            if delta:
                first = first or time.perf_counter()
                chunks += 1
                text += delta
    tokens = usage["completion_tokens"] if usage else chunks
    return (first or time.perf_counter()) - start, tokens, text


def throughput(
    url: str, clients: int, max_tokens: int, extra: dict, prompts: list[str] = PROMPTS
) -> tuple[float, int, list[str]]:
    """Aggregate completion tokens/s of `prompts` sent `clients` at a time, the tokens, and the texts."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda p: stream_completion(url, p, max_tokens, extra), prompts))
    seconds = time.perf_counter() - start
    tokens = sum(t for _, t, _ in done)
    return tokens / seconds, tokens, [text for _, _, text in done]


def ttft(url: str, busy: int, extra: dict, samples: int = 7) -> float:
    """Median time to first token of a new request while `busy` clients keep decoding."""
    stop = threading.Event()

    def keep_busy(index: int) -> None:
        while not stop.is_set():
            stream_completion(url, PROMPTS[index], 64, extra)

    threads = [threading.Thread(target=keep_busy, args=(i,)) for i in range(busy)]
    for thread in threads:
        thread.start()
    time.sleep(1.0 if busy else 0)
    times = []
    for _ in range(samples):
        times.append(stream_completion(url, TTFT_PROMPT, 4, extra)[0])
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    return statistics.median(times)


@dataclass
class Streams:
    """One engine's aggregate rates with 1 client (request in flight) and with 4, measured back to back."""

    engine: str  # "ortspec", "OpenVINO GenAI", "llama.cpp"
    name: str
    load: float  # the 1-minute load average as the phases started
    rate: dict[int, float] = field(default_factory=dict)  # clients -> tokens/s (wall clock)
    per_cpu: dict[int, float] = field(default_factory=dict)  # clients -> tokens per CPU-second of the engine
    tokens: dict[int, int] = field(default_factory=dict)  # clients -> completion tokens


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(
    streams: Streams, url: str, pid: int, clients: int, max_tokens: int, extra: dict, prompts: list[str]
) -> list[str]:
    """`throughput` into `streams`, with tokens per second of the server's CPU time (other jobs on the
    machine slow the wall clock, hardly that); the texts."""
    cpu = cpu_seconds(pid)
    rate, tokens, texts = throughput(url, clients, max_tokens, extra, prompts)
    streams.rate[clients], streams.tokens[clients] = rate, tokens
    streams.per_cpu[clients] = tokens / (cpu_seconds(pid) - cpu)
    return texts


def measure(
    name: str, url: str, pid: int, max_tokens: int, extra: dict, prompts: list[str], ttfts: bool = True
) -> list[Streams]:
    with ThreadPoolExecutor(4) as pool:  # warm-up: every slot's first calls (its KV memory's first touch)
        list(pool.map(lambda p: stream_completion(url, p, 8, extra), prompts[:4]))
    streams = Streams("llama.cpp" if "llama" in name else "ortspec", f"{name}, draft=none", os.getloadavg()[0])
    texts_one = phase(streams, url, pid, 1, max_tokens, extra, prompts)
    texts_four = phase(streams, url, pid, 4, max_tokens, extra, prompts)
    same = sum(a == b for a, b in zip(texts_one, texts_four, strict=True))
    idle = ttft(url, 0, extra) if ttfts else float("nan")
    busy = ttft(url, 3, extra) if ttfts else float("nan")
    one, four = streams.rate[1], streams.rate[4]
    print(
        f"| {name} | {one:.1f} | {four:.1f} | {four / one:.2f}x | {idle * 1000:.0f} | {busy * 1000:.0f} | "
        f"{busy / idle:.2f}x | {streams.tokens[1]}/{streams.tokens[4]} | {same}/{len(prompts)} |",
        flush=True,
    )
    return [streams]


def measure_drafting(name: str, url: str, pid: int, max_tokens: int, extra: dict, prompts: list[str]) -> list[Streams]:
    """1 client and 4, without drafting and with, on one server: aggregate tokens/s, and tokens per second
    of the server's CPU time; the load average as the phases start."""
    none = {**extra, "draft": "none"}
    with ThreadPoolExecutor(4) as pool:  # warm-up, both ways
        list(pool.map(lambda p: stream_completion(url, p, 8, extra), prompts[:4]))
        list(pool.map(lambda p: stream_completion(url, p, 8, none), prompts[:4]))
    load = os.getloadavg()[0]
    plain, drafting = Streams("ortspec", f"{name}, draft=none", load), Streams("ortspec", f"{name}, drafting", load)
    for streams, clients, options in ((plain, 1, none), (drafting, 1, extra), (plain, 4, none), (drafting, 4, extra)):
        phase(streams, url, pid, clients, max_tokens, options, prompts)
    r, c, n = drafting.rate, drafting.per_cpu, plain.rate
    print(
        f"| {name} | {n[1]:.1f} | {r[1]:.1f} | {r[1] / n[1]:.2f}x | {n[4]:.1f} "
        f"| {r[4]:.1f} | **{r[4] / r[1]:.2f}x** | {n[4] / n[1]:.2f}x "
        f"| {c[1] / plain.per_cpu[1]:.2f}x | **{c[4] / c[1]:.2f}x** | {load:.2f} |",
        flush=True,
    )
    return [plain, drafting]


def prompt_ids(package: str, prompts: list[str], chats: bool) -> list[list[int]]:
    """The token ids `ortspec serve` makes of `prompts` (the package's tokenizer; chats: its chat template),
    for a peer that takes token ids."""
    pipe = ortspec.load(package, verify=False)
    if chats:
        return [pipe.chat_prompt([{"role": "user", "content": prompt}]) for prompt in prompts]
    return [pipe.tokenizer.encode(prompt) for prompt in prompts]


def start_openvino(venv: Path, gguf: str, threads: int, precision: str) -> tuple[VenvWorker, str]:
    """OpenVINO GenAI's ContinuousBatchingPipeline on `gguf` in its venv, with `threads` inference threads and
    `precision` as its inference precision hint ("default": the CPU plugin's own)."""
    worker = VenvWorker(ensure_venv(venv), Path(__file__).with_name("openvino_worker.py"), "OpenVINO GenAI")
    hint = None if precision == "default" else precision
    answer = worker.ask(op="load", gguf=gguf, threads=threads, precision=hint)
    name = f"OpenVINO GenAI CB, {answer['precision']}, KV {answer['kv_cache']}"
    print(f"{name}: {answer['ready']}, INFERENCE_NUM_THREADS {threads}", flush=True)
    return worker, name


def measure_openvino(name: str, worker: VenvWorker, prompts: list[list[int]], max_tokens: int) -> list[Streams]:
    """The prompts with 1 request in flight, then 4 (each next one added as one finishes)."""
    worker.ask(op="run", prompts=prompts[:4], in_flight=4, max_new_tokens=8)  # warm-up
    streams = Streams("OpenVINO GenAI", name, os.getloadavg()[0])
    for in_flight in (1, 4):
        answer = worker.ask(op="run", prompts=prompts, in_flight=in_flight, max_new_tokens=max_tokens)
        tokens = sum(len(ids) for ids in answer["tokens"])
        streams.tokens[in_flight] = tokens
        streams.rate[in_flight] = tokens / answer["seconds"]
        streams.per_cpu[in_flight] = tokens / answer["cpu"]
    r, load = streams.rate, streams.load
    print(f"{name}: 1 in flight {r[1]:.1f} tok/s, 4 {r[4]:.1f} ({r[4] / r[1]:.2f}x), load {load:.2f}", flush=True)
    return [streams]


def compare(results: list[tuple[int, Streams]]) -> None:
    """Every engine's 1 vs 4, then each ortspec row against each peer row of the same round."""
    print(
        "\n| round | engine | 1 tok/s | 4 tok/s | 4 vs 1 | 1, per CPU-s | 4, per CPU-s | 4 vs 1, per CPU-s "
        "| tokens 1/4 | load |"
    )
    print("|---" * 10 + "|")
    for round_, s in results:
        r, c = s.rate, s.per_cpu
        print(
            f"| {round_} | {s.name} | {r[1]:.1f} | {r[4]:.1f} | {r[4] / r[1]:.2f}x | {c[1]:.1f} | {c[4]:.1f} "
            f"| {c[4] / c[1]:.2f}x | {s.tokens[1]}/{s.tokens[4]} | {s.load:.2f} |"
        )
    ours = [(i, row) for i, row in results if row.engine == "ortspec"]
    pairs = [(i, a, b) for i, a in ours for j, b in results if i == j and b.engine != "ortspec"]
    if not pairs:
        return
    print("\n| round | ortspec | peer | 4: ortspec / peer | 1: ortspec / peer | 4, per CPU-s | 1, per CPU-s |")
    print("|---" * 7 + "|")
    for round_, mine, peer in pairs:
        r, c = mine.rate, mine.per_cpu
        print(
            f"| {round_} | {mine.name} | {peer.name} | **{r[4] / peer.rate[4]:.2f}x** | {r[1] / peer.rate[1]:.2f}x "
            f"| {c[4] / peer.per_cpu[4]:.2f}x | {c[1] / peer.per_cpu[1]:.2f}x |"
        )
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


def exactness(package: str, threads: int, max_tokens: int) -> None:
    """In-process, by token ids: each prompt's greedy output alone vs 4 at a time in one batch, divergences
    classified as the bench does (a logit gap under NEAR_TIE at the first differing token: a near-tie)."""
    # no prefix cache: each run prefills its whole prompt, as divergence_gap replays the run alone
    pipe = ortspec.load(package, threads=threads, batch=4, prefix_cache=False)
    options = dict(max_new_tokens=max_tokens, use_draft=False)
    alone = [pipe.generate(prompt, **options).token_ids for prompt in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda prompt: pipe.generate(prompt, **options).token_ids, PROMPTS))
    gaps = [divergence_gap(pipe, p, a, b)[1] for p, a, b in zip(PROMPTS, alone, batched, strict=True) if a != b]
    ties = sum(0 <= gap < NEAR_TIE for gap in gaps)
    mean = pipe.batch.stepped / max(pipe.batch.calls, 1)
    print(
        f"greedy token ids, alone vs 4 in a batch (in-process, {mean:.2f} rows per batched call): "
        f"{len(PROMPTS) - len(gaps)}/{len(PROMPTS)} equal, {ties} near-ties, {len(gaps) - ties} mismatches"
    )


def serving(
    command: list[str], port: int, run: Callable[[str, int], list[Streams]], tree: str | None = None
) -> list[Streams]:
    env = {**os.environ, "PYTHONPATH": tree} if tree else None  # the ortspec source tree the server runs
    # run from the tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tree or None
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        return run(url, server.pid)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--unbatched", action="store_true", help="also measure ortspec serve --no-batch")
    parser.add_argument("--drafting", action="store_true", help="drafting against draft=none, not draft=none alone")
    parser.add_argument("--draft", help="with --drafting: the drafter requests ask for (default: the server's)")
    parser.add_argument("--chats", action="store_true", help="chat requests of CHATS, not completions of PROMPTS")
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR: an arm served from source tree DIR")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the arms, alternating")
    parser.add_argument("--no-ttft", action="store_true", help="skip the TTFT phases and the exactness check")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary, to compare on --gguf")
    parser.add_argument("--gguf", help="the GGUF the package was exported from")
    parser.add_argument(
        "--openvino",
        action="append",
        default=[],
        choices=["default", "bf16", "f32"],
        help="PRECISION: an arm of OpenVINO GenAI's continuous batching on --gguf, with this inference precision",
    )
    parser.add_argument("--openvino-venv", type=Path, default=Path("/work/tools/openvino-venv"))
    args = parser.parse_args()
    if (args.llama_server or args.openvino) and not args.gguf:
        parser.error("--llama-server and --openvino need --gguf")
    ortspec = [sys.executable, "-m", "ortspec.cli"]
    if os.environ.get("ORTSPEC_BIN"):
        ortspec = [os.environ["ORTSPEC_BIN"]]
    prompts = CHATS if args.chats else PROMPTS
    kind = "chats" if args.chats else "prompts"
    print(f"{len(prompts)} {kind}, max_tokens {args.max_tokens}, --parallel 4, {args.threads} threads, greedy")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    package = str(Path(args.package).resolve()) if Path(args.package).is_dir() else args.package  # servers' cwd: DIR
    peers = []  # OpenVINO workers, loaded before the first round (its model compiles once)
    if args.openvino:
        ids = prompt_ids(package, prompts, args.chats)
        peers = [start_openvino(args.openvino_venv, args.gguf, args.threads, hint) for hint in args.openvino]
    if args.drafting:
        print(
            "| server | 1 client, none tok/s | 1 client, drafting | draft vs none | 4 clients, none | "
            "4 clients, drafting | 4 vs 1 (drafting) | 4 vs 1 (none) | draft vs none, per CPU-s "
            "| 4 vs 1 (drafting), per CPU-s | load |"
        )
    else:
        print(
            "| server | 1 client tok/s | 4 clients tok/s | 4 vs 1 | TTFT idle ms | TTFT 3 busy ms | busy vs idle "
            "| tokens 1/4 | same text 1 vs 4 |"
        )
    print("|---" * (11 if args.drafting else 9) + "|")
    extra: dict = {"chat": True} if args.chats else {}
    if not args.drafting:
        extra["draft"] = "none"
    elif args.draft:
        extra["draft"] = args.draft
    trees = [tuple(tree.split("=", 1)) for tree in args.tree] or [("ortspec serve", None)]
    modes = [("", [])] + ([(" --no-batch", ["--no-batch"])] if args.unbatched else [])
    results: list[tuple[int, Streams]] = []
    for round_ in range(1, args.repeat + 1):
        for tree_name, tree in trees:
            for suffix, flags in modes:
                port = free_port()
                command = [*ortspec, "serve", package, "--port", str(port), "--parallel", "4"]
                command += ["--threads", str(args.threads), "--model-name", "m", *flags]
                phases = measure_drafting if args.drafting else partial(measure, ttfts=not args.no_ttft)
                run = partial(phases, f"{tree_name}{suffix}", max_tokens=args.max_tokens, extra=extra, prompts=prompts)
                rows = serving(command, port, lambda url, pid, run=run: run(url=url, pid=pid), tree)
                results += [(round_, row) for row in rows]
        for worker, name in peers:  # after the servers, never beside them
            results += [(round_, row) for row in measure_openvino(name, worker, ids, args.max_tokens)]
    for worker, _ in peers:
        worker.close()
    if not args.no_ttft:
        exactness(args.package, args.threads, args.max_tokens)
    if args.llama_server:
        port = free_port()
        command = [args.llama_server, "-m", args.gguf, "-np", "4", "-t", str(args.threads), "-c", "8192"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        llama = partial(measure, "llama-server -np 4", max_tokens=args.max_tokens, extra={}, prompts=prompts)
        results += [(args.repeat, row) for row in serving(command, port, lambda url, pid: llama(url=url, pid=pid))]
    compare(results)


if __name__ == "__main__":
    main()
