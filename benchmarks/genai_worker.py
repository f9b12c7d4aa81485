"""onnxruntime-genai worker for benchmarks/peers.py: run in the genai venv, one JSON request per stdin line.

Requests:
  {"op": "load", "name": N, "target": DIR, "draft": DIR|null, "ngram_size": 0|n, "draft_tokens": K,
   "threads": T|null, "work": DIR}
  {"op": "generate", "name": N, "prompt": [ids], "max_new_tokens": M}
Answers one JSON line each: {"ok": true} / {"tokens": [...], "seconds": s, "drafted": d, "accepted": a},
or {"error": "..."}.

How onnxruntime-genai 0.18 speculates (read from its config parser and docs, checked by running):
a draft model is a complete `model.draft` decoder block in the target's genai_config.json (paths
without "..": we write a config directory with `target`/`draft` symlinks); prompt lookup is
`params.set_speculative_options(ngram_size=n, max_draft_tokens=K)` on the plain target.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

MODELS: dict[str, tuple[og.Model, dict]] = {}


def decoder_block(model_dir: Path, link: str, threads: int | None) -> dict:
    block = copy.deepcopy(json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"])
    block["filename"] = f"{link}/{block['filename']}"
    if threads:
        block.setdefault("session_options", {})["intra_op_num_threads"] = threads
    return block


def config_dir(work: Path, name: str, target: Path, draft: Path | None, threads: int | None, k: int) -> Path:
    """A directory whose genai_config.json loads `target` (and `draft`) with `threads` intra-op threads."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    for link, source in (("target", target), ("draft", draft)):
        if source is not None and not (out / link).exists():
            (out / link).symlink_to(source.resolve())
    config = json.loads((target / "genai_config.json").read_text())
    config["model"]["decoder"] = decoder_block(target, "target", threads)
    if draft is not None:
        config["model"]["draft"] = decoder_block(draft, "draft", threads)
        config["speculative"] = {"max_draft_tokens": k}
    (out / "genai_config.json").write_text(json.dumps(config, indent=1))
    for item in target.iterdir():  # tokenizer files, so og.Tokenizer works on the directory too
        if item.name.startswith(("tokenizer", "special_tokens")) and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    return out


def load(request: dict) -> dict:
    draft = Path(request["draft"]) if request.get("draft") else None
    path = config_dir(
        Path(request["work"]),
        request["name"],
        Path(request["target"]),
        draft,
        request.get("threads"),
        request.get("draft_tokens", 4),
    )
    MODELS[request["name"]] = (og.Model(str(path)), request)
    return {"ok": True}


def generate(request: dict) -> dict:
    model, setup = MODELS[request["name"]]
    prompt = np.asarray(request["prompt"], dtype=np.int32)
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + request["max_new_tokens"], do_sample=False)
    if setup.get("ngram_size"):
        params.set_speculative_options(ngram_size=setup["ngram_size"], max_draft_tokens=setup.get("draft_tokens", 4))
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = generator.get_sequence(0)[len(prompt) :].tolist()
    seconds = time.perf_counter() - start
    stats = generator.get_speculative_stats()
    # proposed, not "evaluated" (genai counts only drafts up to a round's first rejection there)
    drafted, accepted = int(stats.get("draft_tokens_proposed", 0)), int(stats.get("draft_tokens_accepted", 0))
    return {"tokens": tokens, "seconds": seconds, "drafted": drafted, "accepted": accepted}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = load(request) if request["op"] == "load" else generate(request)
        except Exception as exc:  # reported to the benchmark, which prints it as the reason
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
