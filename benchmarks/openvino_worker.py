"""OpenVINO GenAI's continuous batching for benchmarks/serve_batching.py: run in the OpenVINO venv, one JSON
request per stdin line, one JSON answer per line.

  {"op": "load", "gguf": FILE, "threads": T, "precision": "bf16" | "f32" | null}
      -> {"ready": versions, "precision": the inference precision, "kv_cache": the KV cache precision}
  {"op": "run", "prompts": [[ids], ...], "in_flight": K, "max_new_tokens": M}
      -> {"tokens": [[new ids], ...], "seconds": wall, "cpu": the process's CPU seconds (all threads)}

`run` keeps K requests in the pipeline (`ContinuousBatchingPipeline.add_request`), stepping it and adding
the next prompt as soon as one finishes: what K clients sending the prompts one after another ask of a
server, without the HTTP. Greedy (the GGUF's generation config, do_sample off), stopping at its eos.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as og


def load(gguf: str, threads: int, precision: str | None) -> tuple[og.ContinuousBatchingPipeline, dict[str, Any]]:
    properties: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        properties["INFERENCE_PRECISION_HINT"] = precision
    pipe = og.ContinuousBatchingPipeline(gguf, og.SchedulerConfig(), "CPU", properties)
    core = ov.Core()  # the plugin's defaults, for the settings not given
    answer = {
        "ready": f"openvino {ov.__version__}, openvino-genai {og.__version__}",
        "precision": precision or core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "kv_cache": core.get_property("CPU", "KV_CACHE_PRECISION").get_type_name(),
    }
    return pipe, answer


def run(pipe: og.ContinuousBatchingPipeline, prompts: list[list[int]], in_flight: int, max_new: int) -> dict:
    config = pipe.get_config()
    config.max_new_tokens = max_new
    config.do_sample = False
    waiting = list(enumerate(prompts))
    running: dict[int, og.GenerationHandle] = {}
    tokens: list[list[int]] = [[] for _ in prompts]
    start, cpu = time.perf_counter(), time.process_time()
    while waiting or running:
        while waiting and len(running) < in_flight:
            index, ids = waiting.pop(0)
            running[index] = pipe.add_request(index, ov.Tensor(np.array([ids], dtype=np.int64)), config)
        pipe.step()
        for index, handle in list(running.items()):
            if handle.get_status() != og.GenerationStatus.RUNNING:
                tokens[index] = list(handle.read_all()[0].generated_ids)
                del running[index]
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def main() -> None:
    pipe = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                pipe, answer = load(request["gguf"], request["threads"], request.get("precision"))
            else:
                assert pipe is not None, "load first"
                answer = run(pipe, request["prompts"], request["in_flight"], request["max_new_tokens"])
        except Exception as exc:  # the peer's own failure is the answer, not a crash of the benchmark
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
