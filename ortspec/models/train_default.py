"""Recipe for the embedded default pair: a small Python-code target and a distilled draft.

    python -m ortspec.models.train_default [--work /tmp/ortspec-train] [--out ortspec/models/default]

Trains, on the CPU and with a fixed seed, on the running CPython's own standard library (`Lib/`,
tests excluded, a fixed list of files held out):
1. a byte-level BPE tokenizer (4,096 tokens);
2. a Llama-architecture target (~7M parameters, tied embeddings) on next-token prediction;
3. a much smaller Llama draft (<= 1/8 of the target's compute per token), distilled from the target
   (KL to the target's distribution + the LM loss) so that the two agree as a real pair should.
Checkpoints go to --work every few hundred steps and a rerun resumes from them. The result is
written to --out as Hugging Face checkpoints (fp16 safetensors) with a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SEED = 0
SEQ_LEN = 512
BATCH = 8
VOCAB = 4096
EOS = "<|endoftext|>"
# Held out from training, used for evaluation and benchmarks (paths relative to Lib/).
HELDOUT = [
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "csv.py",
    "fnmatch.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "zipapp.py",
    "contextlib.py",
    "fractions.py",
    "getopt.py",
    "numbers.py",
    "pprint.py",
    "reprlib.py",
    "tabnanny.py",
]
EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


TARGET = ModelShape(hidden=256, layers=8, heads=8, kv_heads=4, intermediate=768)
DRAFT = ModelShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=320)


def stdlib_files() -> tuple[Path, list[Path], list[Path]]:
    """(Lib dir, training files, held-out files), sorted for reproducibility."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in lib.rglob("*.py")
        if not any(part in EXCLUDED_PARTS or part.startswith("test_") for part in p.relative_to(lib).parts)
    )
    heldout = [lib / name for name in HELDOUT]
    missing = [str(p) for p in heldout if not p.is_file()]
    if missing:
        raise SystemExit(f"held-out files missing from this Python's stdlib: {missing}")
    train = [p for p in files if p not in set(heldout)]
    return lib, train, heldout


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read(p) for p in files), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None).save_pretrained(out)


def encode_files(tokenizer_dir: Path, files: list[Path]) -> np.ndarray:
    """All files as one uint16 stream, each followed by eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tok.encode_batch([read(p) for p in files]):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.uint16)


def llama_config(shape: ModelShape):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=SEQ_LEN,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.02,
    )


def per_token_flops(shape: ModelShape) -> int:
    """Multiply-adds per token of the matmuls (projections, MLP, lm_head): the compute that matters."""
    head_dim = shape.hidden // shape.heads
    attn = shape.hidden * head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    mlp = 3 * shape.hidden * shape.intermediate
    return shape.layers * (attn + mlp) + shape.hidden * VOCAB


def batches(tokens: np.ndarray, rng: np.random.Generator):
    import torch

    while True:
        starts = rng.integers(0, len(tokens) - SEQ_LEN - 1, size=BATCH)
        yield torch.from_numpy(np.stack([tokens[s : s + SEQ_LEN + 1] for s in starts]).astype(np.int64))


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_loss(model, tokens: np.ndarray, max_chunks: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping held-out windows."""
    import torch

    chunks = min(max_chunks, (len(tokens) - 1) // SEQ_LEN)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(chunks):
            window = torch.from_numpy(tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1].astype(np.int64))[None]
            logits = model(window[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += SEQ_LEN
    model.train()
    return total / count


def greedy_agreement(target, draft, tokens: np.ndarray, max_chunks: int = 16) -> float:
    """Share of held-out positions where draft and target pick the same argmax: a proxy for α."""
    import torch

    agree, count = 0, 0
    with torch.no_grad():
        for i in range(min(max_chunks, (len(tokens) - 1) // SEQ_LEN)):
            window = torch.from_numpy(tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN].astype(np.int64))[None]
            agree += (target(window).logits.argmax(-1) == draft(window).logits.argmax(-1)).sum().item()
            count += SEQ_LEN
    return agree / count


def train(
    name: str,
    model,
    teacher,
    tokens: np.ndarray,
    heldout: np.ndarray,
    total_tokens: int,
    peak_lr: float,
    work: Path,
    log,
):
    """Train `model` (distilled from `teacher` when given) with resumable checkpoints in `work`."""
    import torch

    steps = total_tokens // (BATCH * SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = work / f"{name}-state.pt"
    step = 0
    rng = np.random.default_rng(SEED + (1 if teacher is not None else 0))
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
        log(f"{name}: resumed at step {step}/{steps}")
    data = batches(tokens, rng)
    start, seen = time.time(), 0
    model.train()
    while step < steps:
        batch = next(data)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        logits = model(inputs).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                teacher_logp = torch.log_softmax(teacher(inputs).logits, -1)
            logp = torch.log_softmax(logits, -1)
            kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
            loss = kl + 0.5 * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen += inputs.numel()
        if step % 25 == 0 or step == steps:
            rate = seen / (time.time() - start)
            log(f"{name}: step {step}/{steps} loss {loss.item():.3f} ce {ce.item():.3f} {rate:.0f} tok/s")
        if step % 200 == 0 or step == steps:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng}, state_path
            )
            log(f"{name}: checkpoint at step {step}; held-out loss {heldout_loss(model, heldout, 16):.3f}")
    return model


def save(model, tokenizer_dir: Path, out: Path) -> None:
    import torch

    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.generation_config.eos_token_id = 0
    model.generation_config.bos_token_id = 0
    model.generation_config.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    model.to(torch.float32)


def write_model_card(out: Path) -> None:
    """README.md of the shipped pair, from its training.json."""
    r = json.loads((out / "training.json").read_text())
    shapes = r["shapes"]
    lines = [
        "# ortspec default pair: a tiny Python-code target and its distilled draft",
        "",
        "Trained by `ortspec.models.train_default` on the CPU, from scratch, on the Python source of the",
        f"CPython {r['versions']['python']} standard library (`Lib/`, tests excluded). No weights are",
        "downloaded: this pair exists so that `ortspec demo`, tests and benchmarks have a real pair offline.",
        "It writes Python-looking code; it is far too small to be useful for anything else.",
        "",
        "| | target | draft |",
        "|---|---|---|",
        f"| architecture | Llama, {shapes['target']['layers']} layers, hidden {shapes['target']['hidden']}, "
        f"{shapes['target']['heads']} heads / {shapes['target']['kv_heads']} KV heads, MLP "
        f"{shapes['target']['intermediate']} | Llama, {shapes['draft']['layers']} layers, hidden "
        f"{shapes['draft']['hidden']}, {shapes['draft']['heads']} heads / {shapes['draft']['kv_heads']} KV heads, "
        f"MLP {shapes['draft']['intermediate']} |",
        f"| parameters (tied embeddings) | {r['parameters']['target']:,} | {r['parameters']['draft']:,} |",
        f"| training | {r['train_tokens_seen']['target']:,} tokens, next-token loss | "
        f"{r['train_tokens_seen']['draft']:,} tokens, KL to the target + 0.5 x next-token loss |",
        f"| held-out loss (nats/token, shipped fp16 weights) | {r['heldout_loss']['target']} | "
        f"{r['heldout_loss']['draft']} |",
        "",
        f"Tokenizer: byte-level BPE, {shapes['vocab']} tokens, trained on the same training files; context "
        f"{shapes['seq_len']} tokens. The draft costs {r['draft_target_compute_ratio']:.3f} of the target's "
        f"matmul compute per token; on held-out code it picks the target's greedy token at "
        f"{r['greedy_agreement']:.1%} of positions.",
        "",
        f"Held-out files (never trained on): {', '.join(r['heldout_files'])}.",
        "",
        f"Reproduce: `{r['command']}` (seed {r['seed']}; torch {r['versions']['torch']}, transformers "
        f"{r['versions']['transformers']}, numpy {r['versions']['numpy']}, {r['corpus_tokens']['train']:,} "
        "training tokens in the corpus). About an hour on 2 CPU cores; checkpoints in --work allow resuming.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-train"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "default")
    parser.add_argument("--target-tokens", type=int, default=5_000_000)
    parser.add_argument("--draft-tokens", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work / "train.log", "a", buffering=1)  # noqa: SIM115 - lives for the whole run

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        log_file.write(stamped + "\n")

    lib, train_files, heldout_files = stdlib_files()
    tokenizer_dir = args.work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_tokenizer(train_files, tokenizer_dir)
    train_tokens = encode_files(tokenizer_dir, train_files)
    heldout_tokens = encode_files(tokenizer_dir, heldout_files)
    log(
        f"corpus {lib}: {len(train_files)} training files, {len(train_tokens):,} tokens; "
        f"{len(heldout_files)} held-out files, {len(heldout_tokens):,} tokens"
    )

    ratio = per_token_flops(DRAFT) / per_token_flops(TARGET)
    log(f"draft/target compute per token: {ratio:.3f}")
    torch.manual_seed(SEED)
    target = transformers.LlamaForCausalLM(llama_config(TARGET))
    torch.manual_seed(SEED + 1)
    draft = transformers.LlamaForCausalLM(llama_config(DRAFT))
    log(f"target {target.num_parameters():,} parameters; draft {draft.num_parameters():,}")

    train("target", target, None, train_tokens, heldout_tokens, args.target_tokens, 2e-3, args.work, log)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    train("draft", draft, target, train_tokens, heldout_tokens, args.draft_tokens, 3e-3, args.work, log)
    draft.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    save(target, tokenizer_dir, args.out / "target")
    save(draft, tokenizer_dir, args.out / "draft")
    # Report what the shipped (fp16) weights achieve, as a user loading them would measure it.
    shipped = {
        r: transformers.LlamaForCausalLM.from_pretrained(args.out / r, dtype=torch.float32).eval()
        for r in ("target", "draft")
    }
    results = {
        "heldout_loss": {r: round(heldout_loss(m, heldout_tokens, max_chunks=10**6), 4) for r, m in shipped.items()},
        "greedy_agreement": round(greedy_agreement(shipped["target"], shipped["draft"], heldout_tokens), 4),
        "draft_target_compute_ratio": round(ratio, 4),
        "parameters": {r: m.num_parameters() for r, m in shipped.items()},
        "train_tokens_seen": {"target": args.target_tokens, "draft": args.draft_tokens},
        "corpus_tokens": {"train": len(train_tokens), "heldout": len(heldout_tokens)},
        "heldout_files": HELDOUT,
        "seed": SEED,
        "command": "python -m ortspec.models.train_default " + " ".join(sys.argv[1:]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "shapes": {"target": asdict(TARGET), "draft": asdict(DRAFT), "seq_len": SEQ_LEN, "vocab": VOCAB},
    }
    (args.out / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    write_model_card(args.out)
    log(f"done: {json.dumps(results['heldout_loss'])}, greedy agreement {results['greedy_agreement']}")


if __name__ == "__main__":
    main()
