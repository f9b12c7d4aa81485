"""Soak: 1,000 requests against `ortspec serve` (a subprocess on 127.0.0.1); the server's RSS before and after.

    python benchmarks/serve_soak.py [PACKAGE] [--requests 1000] [--clients 4] [--parallel 2] [--warmup 100]

PACKAGE defaults to the embedded default pair. Mixed traffic from --clients threads: completions and
streams, greedy and seeded sampling, stop strings, chat when the package has a chat template, and one
request in ten from a client that leaves mid-stream. The server's RSS (VmRSS) is read after --warmup
requests and again after all of them; the growth in between should stay under 5% (a leak of a slot, a
generation or a buffer per request would show as steady growth). Prints one summary line per phase.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from ortspec.runtime.package.manifest import load_manifest

PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\n\ndef main():\n"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, client: openai.OpenAI, rng: random.Random, chat: bool) -> str:
    """A random request; returns its kind."""
    prompt = rng.choice(PROMPTS)
    options = dict(model="soak", max_tokens=rng.choice([8, 32, 64]))
    if rng.random() < 0.3:
        options.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1000))
    if rng.random() < 0.2:
        options["stop"] = ["\n\n", "return"]
    kind = rng.random()
    if kind < 0.1:  # a client that leaves after the first chunk
        body = {"prompt": prompt, "stream": True, **options}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_bytes())
        return "left"
    stream = kind < 0.5
    if chat and rng.random() < 0.5:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **options)
        if stream:
            list(reply)
        return "chat stream" if stream else "chat"
    reply = client.completions.create(prompt=prompt, stream=stream, **options)
    if stream:
        list(reply)
    return "stream" if stream else "completion"


def run_phase(url: str, count: int, clients: int, seed: int, chat: bool) -> tuple[float, list[float], dict[str, int]]:
    def worker(number: int) -> tuple[list[float], list[str]]:
        rng = random.Random(seed * 1000 + number)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        latencies, kinds = [], []
        for _ in range(count // clients + (number < count % clients)):
            started = time.perf_counter()
            kinds.append(one_request(url, client, rng, chat))
            latencies.append(time.perf_counter() - started)
        return latencies, kinds

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, range(clients)))
    latencies = [x for lat, _ in results for x in lat]
    kinds: dict[str, int] = {}
    for _, ks in results:
        for k in ks:
            kinds[k] = kinds.get(k, 0) + 1
    return time.perf_counter() - started, latencies, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", nargs="?")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    if args.package is None:
        from ortspec.models.default_pair import default_package

        args.package = str(default_package())
    chat = bool(load_manifest(args.package, verify=False).tokenizer.chat_template)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "ortspec.cli", "serve", args.package, "--port", str(port)]
    command += ["--parallel", str(args.parallel), "--model-name", "soak", "--max-queue", str(4 * args.clients)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{server.stderr.read() if server.stderr else ''}")
            time.sleep(0.2)
        print(f"server pid {server.pid}, {args.parallel} slots, {args.clients} clients, chat {'yes' if chat else 'no'}")
        start_rss = rss_kib(server.pid)
        seconds, _, _ = run_phase(url, args.warmup, args.clients, 0, chat)
        before = rss_kib(server.pid)
        print(
            f"warm-up: {args.warmup} requests in {seconds:.1f} s; RSS {start_rss / 1024:.1f} -> {before / 1024:.1f} MiB"
        )
        seconds, latencies, kinds = run_phase(url, args.requests, args.clients, 1, chat)
        time.sleep(1)  # the last clients that left: their generations stop within a round
        after = rss_kib(server.pid)
        health = httpx.get(f"{url}/health").json()
        latencies.sort()
        p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
        growth = (after - before) / before
        print(
            f"soak: {args.requests} requests in {seconds:.1f} s ({args.requests / seconds:.1f} req/s), "
            f"latency p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms; {kinds}"
        )
        print(f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB: growth {growth:+.2%} (limit 5%); health {health}")
        if growth >= 0.05 or health["busy"] or health["waiting"]:
            raise SystemExit("FAILED: RSS grew 5% or more, or a slot is still held")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
