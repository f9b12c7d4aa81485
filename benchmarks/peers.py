"""ortspec against the peers, side by side: same checkpoints, prompts and threads, runs alternating.

Engines and modes (all greedy, the same prompt token ids, `--new` new tokens):
- ortspec: plain, speculative with a fixed γ and with `auto`, prompt lookup (ngram); int4 package
  (builder, MatMulNBits block 32, accuracy level 4);
- transformers `generate` on PyTorch CPU (fp32): plain, `assistant_model`, `prompt_lookup_num_tokens`;
- Optimum `ORTModelForCausalLM` with IO binding, on optimum's export quantized like ours (int4):
  plain, and with `assistant_model` (transformers' assisted generation over ORT);
- onnxruntime-genai: plain, draft-model and n-gram speculation, on int4 models from its own builder
  (defaults: block 32, accuracy level 4), in a separate venv (`--genai-venv`, created on first use:
  its builder needs transformers 5.x, our exporter pins < 4.58) driven through benchmarks/genai_worker.py.

Settings: `default`, the shipped pair on the first lines of the held-out stdlib files (real
acceptance); `random`, a random-weight ~130M/~15M Llama-shaped pair (step costs: the random draft
never agrees with the target, so there speculation can only cost). Every engine runs each prompt in
turn, so load bursts on a shared machine hit all engines alike. Engines that cannot run are listed
with the reason.

    python benchmarks/peers.py [--setting default random] [--threads 2] [--new 64] [--prompts 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import bench_checkpoints, exported
from default_pair import heldout_prompts
from genai_step import ensure_genai_venv
from peer_runners import (
    Run,
    Runner,
    Unavailable,
    VenvWorker,
    genai_runner,
    optimum_model_dir,
    optimum_runner,
    ortspec_runner,
    transformers_runner,
)

GAMMA = 4  # fixed draft length for ortspec and onnxruntime-genai (its default max_draft_tokens)
NGRAM = 3  # longest n-gram for prompt lookup, everywhere


@dataclass
class Totals:
    """Sums over the measured runs of one engine/mode."""

    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.tokens += len(run.tokens)
        self.seconds += run.seconds
        self.drafted += run.drafted or 0
        self.accepted += run.accepted or 0
        self.outputs.append(run.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Setting:
    """One pair of checkpoints, its prompts, and the engine/mode runners to build for it."""

    name: str
    target: Path
    draft: Path
    prompts: list[list[int]]
    runners: dict[str, Callable[[], Runner]]
    plain_of: dict[str, str]  # row -> the same engine's plain row (outputs must match it)


def genai_models(python: Path, work: Path, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """int4 models built by onnxruntime-genai's own builder, once."""
    built = {}
    for name, checkpoint in checkpoints.items():
        out = work / f"genai-{name}"
        if not (out / "genai_config.json").exists():
            command = [python, "-m", "onnxruntime_genai.models.builder", "-m", checkpoint, "-i", checkpoint]
            command += ["-o", out, "-p", "int4", "-e", "cpu", "-c", work / "genai-cache"]
            done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
            if done.returncode:
                raise Unavailable(f"genai builder failed on {checkpoint}: {done.stderr.strip().splitlines()[-1:]}")
        built[name] = out
    return built


def make_setting(name: str, work: Path, args: argparse.Namespace, genai: VenvWorker | None) -> Setting:
    import ortspec

    if name == "default":
        from ortspec.models.default_pair import shipped_pair

        target, draft = shipped_pair()
    else:
        target, draft = bench_checkpoints(work)
    package = exported(work / "ortspec-int4", target, draft=draft, quantize="int4", report=lambda _: None)
    tokenizer = ortspec.load(package, verify=False).tokenizer
    if name == "default":
        prompts = [tokenizer.encode(text) for text in heldout_prompts(args.lines)[: args.prompts]]
    else:
        prompts = [[(7 * i + 13 * p) % 1000 + 10 for i in range(96)] for p in range(args.prompts)]
    threads = args.threads

    def opt(checkpoint: Path, role: str) -> Path:
        return optimum_model_dir(checkpoint, work / f"optimum-{role}-int4")

    runners: dict[str, Callable[[], Runner]] = {
        "ortspec plain": lambda: ortspec_runner(package, threads, use_draft=False),
        f"ortspec draft γ={GAMMA}": lambda: ortspec_runner(package, threads, draft="model", draft_tokens=GAMMA),
        "ortspec draft auto": lambda: ortspec_runner(package, threads, draft="model", draft_tokens="auto"),
        f"ortspec ngram γ={GAMMA}": lambda: ortspec_runner(package, threads, draft="ngram", draft_tokens=GAMMA),
        "ortspec ngram auto": lambda: ortspec_runner(package, threads, draft="ngram", draft_tokens="auto"),
        "transformers plain": lambda: transformers_runner(target, None, threads),
        "transformers assisted": lambda: transformers_runner(target, draft, threads),
        "transformers prompt lookup": lambda: transformers_runner(target, None, threads, prompt_lookup=GAMMA),
        "optimum plain": lambda: optimum_runner(opt(target, "target"), None, threads),
        "optimum assisted": lambda: optimum_runner(opt(target, "target"), opt(draft, "draft"), threads),
    }
    if genai is not None:

        def genai_load(row: str, **options: object) -> Runner:
            models = genai_models(args.genai_python, work, {"target": target, "draft": draft})
            draft_dir = models["draft"] if options.pop("with_draft", False) else None
            return genai_runner(
                genai,
                f"{name}-{row}",
                target=str(models["target"]),
                draft=str(draft_dir) if draft_dir else None,
                threads=threads,
                work=str(work / "genai-configs"),
                **options,
            )

        runners |= {
            "genai plain": lambda: genai_load("plain"),
            f"genai draft K={GAMMA}": lambda: genai_load("draft", with_draft=True, draft_tokens=GAMMA),
            f"genai ngram K={GAMMA}": lambda: genai_load("ngram", ngram_size=NGRAM, draft_tokens=GAMMA),
        }
    plain_of = {row: f"{row.split()[0]} plain" for row in runners}
    return Setting(name, target, draft, prompts, runners, plain_of)


def run_setting(setting: Setting, new_tokens: int, repeats: int) -> tuple[dict[str, Totals], dict[str, str]]:
    """Build every runner (noting the ones that fail), warm each up, then alternate them prompt by prompt."""
    runners: dict[str, Runner] = {}
    failed: dict[str, str] = {}
    for row, build in setting.runners.items():
        try:
            runner = build()
            runner(setting.prompts[0], 4)  # warm-up: a runner that fails here is listed, not timed
            runners[row] = runner
        except Unavailable as exc:
            failed[row] = str(exc)
        except Exception as exc:  # a peer failing in its own code is a result, not a crash of the benchmark
            failed[row] = f"{type(exc).__name__}: {exc}"
        print(f"  {row}: {'ready' if row in runners else 'cannot run: ' + failed[row][:160]}", file=sys.stderr)
    totals = {row: Totals() for row in runners}
    for _ in range(repeats):
        for prompt in setting.prompts:
            for row, runner in runners.items():
                totals[row].add(runner(prompt, new_tokens))
    return totals, failed


def same_output_share(outputs: Sequence[list[int]], reference: Sequence[list[int]]) -> float:
    """Share of runs whose tokens equal the reference run's, up to the shorter (one may stop at eos)."""
    same = sum(a[: min(len(a), len(b))] == b[: min(len(a), len(b))] for a, b in zip(outputs, reference, strict=True))
    return same / len(outputs)


def report(setting: Setting, totals: dict[str, Totals], failed: dict[str, str]) -> None:
    ours = totals.get("ortspec draft auto") or totals["ortspec plain"]
    print(f"\n## setting {setting.name}: {len(setting.prompts)} prompts")
    print(f"target {setting.target}\ndraft  {setting.draft}")
    print(f"{'engine / mode':<28}{'tokens/s':>10}{'accept':>8}{'= own plain*':>13}{'ortspec auto / this':>21}")
    for row, total in totals.items():
        accept = f"{total.accepted / total.drafted:.2f}" if total.drafted else "-"
        plain = totals.get(setting.plain_of[row])
        same = f"{same_output_share(total.outputs, plain.outputs):.0%}" if plain and plain is not total else "-"
        ratio = ours.tokens_per_second / total.tokens_per_second if total.tokens_per_second else float("nan")
        print(f"{row:<28}{total.tokens_per_second:>10.0f}{accept:>8}{same:>13}{ratio:>21.2f}")
    for row, reason in failed.items():
        print(f"{row:<28} cannot run here: {reason}")
    print(
        "tokens/s: new tokens / wall time of whole generations (prefill included); accept: accepted / drafted\n"
        "* share of runs whose tokens equal the same engine's plain run: with int4 accuracy-level-4 kernels a\n"
        "  multi-position call differs from single steps in the last bits, so runs part at near-tied logits\n"
        "  (docs/design.md 'Exactness'); transformers runs fp32 PyTorch"
    )
    pairs = [
        ("ortspec draft auto", "ortspec plain", "auto vs our plain (target >= 0.97)"),
        (f"ortspec draft γ={GAMMA}", "ortspec plain", "fixed γ vs our plain (target >= 2)"),
        ("ortspec draft auto", "transformers assisted", "vs transformers assisted (target >= 3)"),
        (f"ortspec draft γ={GAMMA}", f"genai draft K={GAMMA}", "vs onnxruntime-genai draft, same K (target >= 1.2)"),
        ("ortspec draft auto", f"genai draft K={GAMMA}", "auto vs onnxruntime-genai draft (target >= 1.2)"),
        (f"ortspec ngram γ={GAMMA}", f"genai ngram K={GAMMA}", "prompt lookup vs onnxruntime-genai n-gram"),
        ("ortspec plain", "genai plain", "plain vs onnxruntime-genai plain"),
        ("ortspec plain", "optimum plain", "plain vs Optimum ORT plain"),
    ]
    for ours_row, peer_row, label in pairs:
        if ours_row in totals and peer_row in totals:
            ratio = totals[ours_row].tokens_per_second / totals[peer_row].tokens_per_second
            print(f"  {ours_row} / {peer_row} = {ratio:.2f}x  ({label})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs="+", choices=["default", "random"], default=["default", "random"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-peers"))
    parser.add_argument("--genai-venv", type=Path, default=Path("/tmp/genai-venv"))
    parser.add_argument("--no-genai", action="store_true", help="Skip onnxruntime-genai (no venv is made).")
    parser.add_argument("--threads", type=int, default=2, help="Intra-op threads for every engine.")
    parser.add_argument("--new", type=int, default=64, help="New tokens per prompt.")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--lines", type=int, default=12, help="Lines of each held-out file in a default prompt.")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    genai = None
    if not args.no_genai:
        args.genai_python = ensure_genai_venv(args.genai_venv)
        genai = VenvWorker(args.genai_python, Path(__file__).with_name("genai_worker.py"), "onnxruntime-genai")
    print(f"threads {args.threads}, {args.new} new tokens per prompt, {args.repeats} repeats, greedy")
    try:
        for name in args.setting:
            print(f"# preparing setting {name}", file=sys.stderr)
            setting = make_setting(name, args.work / name, args, genai)
            totals, failed = run_setting(setting, args.new, args.repeats)
            report(setting, totals, failed)
    finally:
        if genai is not None:
            genai.close()


if __name__ == "__main__":
    main()
