"""One runner per (engine, mode) for benchmarks/peers.py: greedy generation from prompt token ids.

Every runner takes the same prompt ids and max_new_tokens and returns the new token ids, the wall
time and (where the engine says) how many drafts it proposed and the target accepted. Engines that
cannot run here raise `Unavailable` with the reason, which the benchmark prints instead of a row.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Unavailable(RuntimeError):
    """This engine or mode cannot run here; the message says why."""


@dataclass
class Run:
    """One greedy generation."""

    tokens: list[int]
    seconds: float
    drafted: int | None = None
    accepted: int | None = None


Runner = Callable[[Sequence[int], int], Run]


def ortspec_runner(package: Path, threads: int | None, pool: bool = True, **options: Any) -> Runner:
    """ortspec's Pipeline on a package, with generation `options` (use_draft, draft, draft_tokens).
    `pool=False` empties the suffix pool before each generation (keeping the learned confidence table):
    against a peer without one, and so that a repeated prompt never drafts from its own earlier answer."""
    import ortspec
    from ortspec.runtime.drafters.suffix import SuffixMemory

    pipe = ortspec.load(package, threads=threads, verify=False)

    def run(prompt: Sequence[int], max_new_tokens: int) -> Run:
        if not pool:
            pipe.suffix_memory = SuffixMemory(confidence=pipe.suffix_memory.confidence)
        result = pipe.generate(list(prompt), max_new_tokens=max_new_tokens, **options)
        stats = result.stats
        return Run(result.token_ids, stats.seconds, stats.drafted_tokens, stats.accepted_tokens)

    return run


def _torch_greedy(model: Any, prompt: Sequence[int], max_new_tokens: int, eos: int | None, **extra: Any) -> Run:
    import torch

    ids = torch.tensor([list(prompt)])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos,
            **extra,
        )
    seconds = time.perf_counter() - start
    return Run([int(t) for t in out[0, len(prompt) :]], seconds)


def transformers_runner(target: Path, draft: Path | None, threads: int | None, prompt_lookup: int = 0) -> Runner:
    """transformers `generate` on PyTorch CPU (fp32): plain, with `assistant_model`, or prompt lookup."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    extra: dict[str, Any] = {}
    if draft is not None:
        extra["assistant_model"] = AutoModelForCausalLM.from_pretrained(draft, torch_dtype=torch.float32).eval()
    if prompt_lookup:
        extra["prompt_lookup_num_tokens"] = prompt_lookup
    eos = model.generation_config.eos_token_id

    def run(prompt: Sequence[int], max_new_tokens: int) -> Run:
        return _torch_greedy(model, prompt, max_new_tokens, eos, **extra)

    return run


def optimum_model_dir(checkpoint: Path, out: Path) -> Path:
    """optimum's ONNX export of `checkpoint` with its MatMuls quantized like ours (int4, block 32, acc 4)."""
    import onnx
    from optimum.onnxruntime import ORTModelForCausalLM

    if not (out / "model.onnx").exists():
        from ortspec.export.quantize import quantize_weights

        fp32 = out.with_name(out.name + "-fp32")
        ORTModelForCausalLM.from_pretrained(checkpoint, export=True, use_cache=True).save_pretrained(fp32)
        quantized, _ = quantize_weights(onnx.load(fp32 / "model.onnx"), bits=4)
        out.mkdir(parents=True, exist_ok=True)
        for item in fp32.iterdir():
            if not item.name.startswith("model.onnx"):
                (out / item.name).write_bytes(item.read_bytes())
        onnx.save(quantized, out / "model.onnx")
    return out


def optimum_runner(target_dir: Path, draft_dir: Path | None, threads: int | None) -> Runner:
    """Optimum's `ORTModelForCausalLM` with IO binding; with a draft, transformers' assisted generation on it."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads

    def load(path: Path) -> Any:
        return ORTModelForCausalLM.from_pretrained(path, use_io_binding=True, use_cache=True, session_options=options)

    model = load(target_dir)
    extra = {"assistant_model": load(draft_dir)} if draft_dir is not None else {}
    eos = model.generation_config.eos_token_id
    if extra:
        try:
            _torch_greedy(model, [1, 2, 3], 4, eos, **extra)
        except Exception as exc:  # the peer's own failure, reported as the reason
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

    def run(prompt: Sequence[int], max_new_tokens: int) -> Run:
        return _torch_greedy(model, prompt, max_new_tokens, eos, **extra)

    return run


class VenvWorker:
    """A peer in its own venv (onnxruntime-genai, OpenVINO GenAI): a subprocess of `python` running `script`,
    answering one JSON request per line; an answer with "error" raises `Unavailable`."""

    def __init__(self, python: Path, script: Path, peer: str) -> None:
        self.peer = peer
        self.process = subprocess.Popen(
            [str(python), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise Unavailable(f"the {self.peer} worker exited (code {self.process.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise Unavailable(answer["error"])
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=30)


def genai_runner(worker: VenvWorker, name: str, **load: Any) -> Runner:
    """A model (or speculative composite) loaded in the genai worker under `name`."""
    worker.ask(op="load", name=name, **load)

    def run(prompt: Sequence[int], max_new_tokens: int) -> Run:
        answer = worker.ask(op="generate", name=name, prompt=list(prompt), max_new_tokens=max_new_tokens)
        return Run(answer["tokens"], answer["seconds"], answer.get("drafted"), answer.get("accepted"))

    return run
