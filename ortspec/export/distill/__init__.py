"""`ortspec distill`: train a draft head for a target that has no draft, on this machine, offline.

The steps, each resumable (an interrupted run picks up where it stopped):
1. export the target alone (builder, quantized as it will be served) into OUT/target-package;
2. data: the target answers the user's own requests (`--prompts`) first, then writes chats to
   itself (see `data.py`), and keeps the final features of every token as it writes (`features.py`);
   `writers` processes write at once (`writers.py`). Held-out chats are made with other seeds (and
   some of the user's requests are set aside), never trained on. Local text given is read once by
   the target for its features;
3. train the head (`train.py`) for the rest of the time budget; write OUT/head.json,
   OUT/head.safetensors and a model card;
4. report the held-out acceptance by running the head in a package with the target.

OUT/data holds one `SequenceStore` each for chats/, held-out/, prompts/, prompts-held-out/ and text/:
the sequences and their features, always appended together.
"""

from __future__ import annotations

import importlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.options import check_paths, check_threads
from ortspec.runtime.text.prompt_files import read_requests

from ..builder import weight_reader
from ..builder.graph import check_feature_layers
from ..builder.head import HEAD_CONFIG, HEAD_FORMAT, HEAD_KIND, LM_DRAFT_CONFIG, head_decoder_config, target_fingerprint
from ..checkpoint import resolve_checkpoint
from ..publish import PackageExistsError, claim
from .data import text_file_sequences
from .features import SequenceStore, open_target, sequence_features
from .writers import default_batch, default_writers, write_chats

Reporter = Callable[[str], None]
KINDS = ("head", "lm")
HELD_OUT_SEED = 1_000_000
MAX_SEQUENCE = 1024
STORES = ("chats", "held-out", "prompts", "prompts-held-out", "text")
MARKER = "ortspec-distill.json"  # what makes a folder distill's own: only such a folder is written into
EXTRAS = {"head": ("torch", "tqdm"), "lm": ("torch", "tqdm", "transformers")}  # imported lazily, while running


class MissingExtrasError(ImportError, ValueError):
    """`distill` runs without the export extras it imports while running (torch, ...)."""


@dataclass(frozen=True)
class DistillConfig:
    minutes: float = 60.0
    data_share: float = 0.5  # of the budget spent making new chats with their features (the rest: training)
    text: tuple[str, ...] = ()  # local text files or directories to train on as well
    prompts: tuple[str, ...] = ()  # files of the user's own requests, answered by the target before any sampled
    quantize: str = "int4"  # how the target is exported (features come from the graph that will serve)
    vocab: int = 4096  # tokens the head may propose: the most frequent in the data
    held_out: int = 12  # held-out chats for the final measurement
    threads: int | None = None
    writers: int | None = None  # processes writing chats at once (default: one per core or thread)
    batch: int | None = None  # chats each writer writes at once, their steps batched (None: `default_batch`)
    kind: str = "head"  # "head": a feature-level head (EAGLE-style); "lm": a small independent Llama draft
    max_chats: int | None = None  # stop making chats after this many (tests)
    max_answer_tokens: int = 256
    feature_layers: tuple[int, ...] | None = None  # inner layers the head reads too (None: `default_feature_layers`)

    @property
    def writer_count(self) -> int:
        return self.writers or default_writers(self.threads)

    @property
    def rows(self) -> int:
        """Chats each writer writes at once."""
        return self.batch if self.batch is not None else default_batch(self.writer_count)


def _advance(bar: Any, began: float) -> None:
    """Move a training bar to the seconds this run has trained (a resumed run's earlier ones do not count)."""
    bar.update(min(round(time.monotonic() - began), bar.total) - bar.n)


def _progress_bar(total: float | None, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, leave=True, mininterval=1.0)


def default_feature_layers(layers: int) -> tuple[int, ...]:
    """The inner layers a head reads besides the final features: after ~27% and ~73% of the target's
    layers (8 and 22 of SmolLM2-135M's 30, which beat 3 and 15 in benchmarks/head_features_ab.py)."""
    return tuple(sorted({k for k in (round(0.27 * layers), round(0.73 * layers)) if 0 < k < layers}))


def _export_target(target: str, package: Path, quantize: str, feature_layers: Sequence[int], report: Reporter) -> None:
    from ..pair import export_pair

    if (package / "manifest.json").is_file():
        return
    report(f"exporting the target {target} ({quantize}) into {package}")
    export_pair(
        target,
        package,
        quantize=quantize,
        exporter="builder",
        feature_layers=feature_layers,
        report=lambda line: report("  " + line),
    )


def _check_layout(data: Path, feature_layers: Sequence[int], hidden: int, pipe: Any) -> None:
    """The stored features, the target package and this run must agree on which layers the features hold
    (data of a run from before fused features holds the final ones alone)."""
    layout = data / "layout.json"
    has_data = any((data / name / "items.jsonl").is_file() for name in STORES)
    stored = json.loads(layout.read_text())["feature_layers"] if layout.is_file() else [] if has_data else None
    if stored is not None and list(stored) != list(feature_layers):
        given = ",".join(map(str, stored)) or "none"
        raise ValueError(
            f"the data in {data} holds features of layers {stored or 'final only'}, not {list(feature_layers)}: "
            f"resume it with --feature-layers {given}, or give another --out"
        )
    width = pipe.target.hidden_size
    if width != hidden * (1 + len(feature_layers)):
        raise ValueError(
            f"{data.parent / 'target-package'} gives {width // hidden} feature vector(s) per token, not "
            f"{1 + len(feature_layers)}: delete it (it is re-exported) or give another --out"
        )
    layout.write_text(json.dumps({"feature_layers": list(feature_layers)}))


def _make_chats(
    store: SequenceStore,
    pipe: Any,
    package: Path,
    seed: int,
    count: int,
    deadline: float,
    config: DistillConfig,
    report: Reporter,
    requests: list[list[dict[str, str]]] | None = None,
    todo: list[int] | None = None,
) -> None:
    """Append chats and their features to `store` until `count` exist or the deadline passes (with
    `requests`: the chats at the indices `todo` answered, or the deadline)."""
    have = len(store)
    if have >= count or time.monotonic() >= deadline or (requests is not None and not todo):
        return
    chats = write_chats(
        pipe,
        package,
        seed + have,
        config.writer_count,
        config.threads,
        config.max_answer_tokens,
        config.rows,
        requests,
        todo,
    )
    name, tokens, started = store.path.parent.name, 0, time.monotonic()
    with closing(chats), _progress_bar(count if count < 10**6 else None, "chat", f"target writing {name}") as bar:
        bar.update(have)
        for item, features in chats:
            store.append(item, features)
            tokens += len(item["tokens"])
            bar.update(1)
            if len(store) >= count or time.monotonic() >= deadline:
                break
    seconds, writers = time.monotonic() - started, config.writer_count
    report(
        f"{name}: {len(store) - have} new chats, {tokens:,} tokens with their features in {seconds:.0f} s "
        f"({tokens / max(seconds, 1e-9):.0f} tok/s, {writers} writer{'s' if writers > 1 else ''} "
        f"x {config.rows} at once)"
    )


def _text(store: SequenceStore, pipe: Any, paths: Sequence[str], length: int) -> None:
    """Cut the local text into sequences and store them with their features (resuming where it stopped)."""
    pieces = list(text_file_sequences(pipe, [Path(p) for p in paths], length))[len(store) :]
    if not pieces:
        return
    reader = DecoderState(pipe.target)
    with _progress_bar(sum(len(p["tokens"]) for p in pieces), "tok", "target reading text") as bar:
        for piece in pieces:
            store.append(piece, sequence_features(reader, piece["tokens"]))
            bar.update(len(piece["tokens"]))


def held_out_indices(count: int, wanted: int) -> list[int]:
    """Which of `count` given requests to set aside for measuring: up to `wanted`, at most one in ten
    (none of fewer than ten), spread evenly over the file."""
    k = min(wanted, count // 10)
    return sorted({i * count // k for i in range(k)}) if k else []


def _given_requests(paths: Sequence[str], data: Path) -> list[list[dict[str, str]]]:
    """The chats of the --prompts files; a resumed run must be given the same ones (their indices are
    what its stores record)."""
    requests = [chat for path in paths for chat in read_requests(Path(path))]
    if not requests:
        raise ValueError(f"--prompts {', '.join(paths)}: no requests in the file(s)")
    saved = data / "prompts.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != requests:
        raise ValueError(
            f"--prompts differ from the requests the run in {data.parent} began with: give the same files, "
            "or another --out"
        )
    saved.write_text(json.dumps(requests), encoding="utf-8")
    return requests


def _answer_requests(
    stores: tuple[SequenceStore, SequenceStore],
    pipe: Any,
    package: Path,
    deadline: float,
    config: DistillConfig,
    report: Reporter,
) -> None:
    """The target answers the user's requests: the held-out ones first, then the rest until `deadline`."""
    held, trained = stores
    requests = _given_requests(config.prompts, held.path.parent.parent)
    held_out = held_out_indices(len(requests), config.held_out)
    for store, indices in ((held, held_out), (trained, sorted(set(range(len(requests))) - set(held_out)))):
        done = {item["request_index"] for item in store.items}
        todo = [i for i in indices if i not in done]
        _make_chats(store, pipe, package, 0, len(store) + len(todo), deadline, config, report, requests, todo)


def vocabulary_subset(sequences: Sequence[Sequence[int]], size: int, vocab_size: int) -> tuple[np.ndarray, float]:
    """The `size` most frequent tokens of the data, and the share of token occurrences they cover."""
    counts = Counter(t for seq in sequences for t in seq)
    chosen = [t for t, _ in counts.most_common(size) if t < vocab_size]
    covered = sum(counts[t] for t in chosen) / max(sum(counts.values()), 1)
    return np.array(sorted(chosen), np.int64), covered


def distill(target: str, out: str | Path, config: DistillConfig = DistillConfig(), report: Reporter = print) -> Path:
    """Train a draft head for `target` (HF directory, hub id or GGUF) into `out`; return `out`. `out` is
    claimed for the run (a second run into it fails at once) and must be new, empty or distill's own."""
    check_paths(target=target, out=out, text=config.text, prompts=config.prompts)
    check_threads("threads", config.threads)
    check_threads("writers", config.writers)
    if config.rows < 1:
        raise ValueError(f"batch must be at least 1, got {config.rows}")
    if config.kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {config.kind!r}")
    for name in EXTRAS[config.kind]:  # before anything is written, not deep in a run
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtrasError(
                f"`ortspec distill` needs the export extras ({name} is missing): pip install 'ortspec[export]'"
            ) from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out.resolve(), "distill"):
        _check_own_folder(out)
        out.mkdir(exist_ok=True)
        (out / MARKER).write_text(json.dumps({"written_by": "ortspec distill", "target": str(target)}) + "\n")
        return _distill(target, out, config, report)


def _check_own_folder(out: Path) -> None:
    """Refuse an `out` that distill did not make: it writes README.md, head.json... and must not replace a
    user's. Its own folder has its marker (or, from before the marker, its data layout)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PackageExistsError(f"--out {out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER).is_file() and not (out / "data" / "layout.json").is_file():
        raise PackageExistsError(
            f"--out {out} holds files that ortspec distill did not write (no {MARKER}); refusing to write into it: "
            "give a new or empty directory, or the --out of an earlier distill to resume it"
        )


def _distill(target: str, out: Path, config: DistillConfig, report: Reporter) -> Path:
    from .head_model import FeatureHead, save_head_weights
    from .train import TrainConfig, train_head

    start = time.monotonic()
    deadline = start + config.minutes * 60
    other = {"head": LM_DRAFT_CONFIG, "lm": HEAD_CONFIG}[config.kind]
    if (out / other).is_file():
        raise ValueError(f"{out} holds a draft of another kind ({other}): give another --out")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_checkpoint(target)
    reader = weight_reader(checkpoint.path, checkpoint.config)
    cfg = reader.cfg
    layers = config.feature_layers
    if layers is None:
        layers = default_feature_layers(cfg.layers) if config.kind == "head" else ()
    check_feature_layers(layers, cfg.layers)
    package = out / "target-package"
    _export_target(target, package, config.quantize, layers, report)
    in_process = config.writer_count == 1  # chats written by this process
    pipe = open_target(package, config.threads, MAX_SEQUENCE, config.rows if in_process else 1)
    _check_layout(data, layers, cfg.hidden, pipe)
    longest = pipe.target.max_length

    width = cfg.hidden * (1 + len(layers))  # final features, then each of `layers`
    chats, held, given, given_held, texts = (SequenceStore(data / name, width) for name in STORES)
    if pipe.manifest.tokenizer.chat_template:
        held_out_deadline = start + max(30.0, config.minutes * 6)  # a tenth of the budget, at least 30 s
        _make_chats(held, pipe, package, HELD_OUT_SEED, config.held_out, held_out_deadline, config, report)
        data_deadline = start + config.minutes * 60 * config.data_share
        if config.prompts:
            _answer_requests((given_held, given), pipe, package, data_deadline, config, report)
        _make_chats(chats, pipe, package, 0, config.max_chats or 10**9, data_deadline, config, report)
    elif config.prompts:
        raise ValueError("--prompts needs a target with a chat template (its requests are answered as chats)")
    else:
        report("the target has no chat template: training on the local text (--text) alone")
    if config.text:
        _text(texts, pipe, config.text, min(512, longest))
    pairs = [(t, f) for t, f in texts.load() + given.load() + chats.load() if len(t) >= 2]
    if not pairs:
        raise ValueError("no training data was made: raise --minutes or give --text")
    sequences = [tokens for tokens, _ in pairs]
    if config.kind == "lm":
        tokenizer_dir = pipe.manifest.tokenizer_json().parent
        return _distill_lm(
            target, out, checkpoint.config, reader, tokenizer_dir, sequences, held, deadline, config, report
        )

    # the tokens the head may propose: the most frequent of the target's own chats (what it will be asked
    # to draft), of all the data when there are none; local text would crowd out the answers' tokens
    answers = [item["tokens"] for item in given.items + chats.items]
    subset, coverage = vocabulary_subset(answers or sequences, config.vocab, cfg.vocab_size)
    subset_path = out / "vocab_subset.npy"
    if subset_path.is_file():  # a resumed run keeps the subset its head was trained with
        subset = np.load(subset_path)
    np.save(subset_path, subset)
    lm_head = reader.lm_head()
    head = FeatureHead(head_decoder_config(cfg), reader.embedding(), lm_head[:, subset].T, 1 + len(layers))
    last = cfg.layers - 1
    head.init_from_target(_layer_tensors(reader, last), reader.final_norm())

    seconds = max(deadline - time.monotonic(), 10.0)
    token_arrays = [np.asarray(s, np.int64) for s in sequences]
    features = [f for _, f in pairs]
    report(
        f"training the head on {sum(map(len, sequences)):,} tokens in {len(sequences)} sequences "
        f"for {seconds / 60:.1f} min (vocabulary subset {len(subset)} tokens, covering {coverage:.1%} of the "
        f"{'chats' if answers else 'data'})"
    )
    with _progress_bar(round(seconds), "s", "training") as bar:
        began = time.monotonic()

        def on_step(progress: Any, loss: float, agree: float) -> None:
            if progress.steps % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", agree=f"{agree:.2f}", refresh=False)
                _advance(bar, began)

        progress = train_head(head, token_arrays, features, TrainConfig(seconds=seconds), out, on_step)
    held_agreement, given_agreement = (_agreement(head, subset, store) for store in (held, given_held))
    save_head_weights(head, subset, out)
    training = {
        "target": str(target),
        "data": "on-policy: "
        + (f"{len(given)} of the user's own requests (--prompts) and " if len(given) else "")
        + "requests sampled from the target's own chat template (most begun with a common request word), "
        "answered greedily by it"
        + (f"; plus {len(texts)} pieces of local text" if len(texts) else "")
        + (f" (from {', '.join(config.text)})" if config.text else ""),
        "sequences": len(sequences),
        "tokens": int(sum(map(len, sequences))),
        "tokens_seen": progress.tokens,
        "steps": progress.steps,
        "train_seconds": round(progress.seconds),
        "vocab_subset": len(subset),
        "vocab_coverage": round(coverage, 4),
        "vocab_source": "chats" if answers else "data",
        "held_out_agreement": None if held_agreement is None else round(held_agreement, 4),
        "target_quantization": config.quantize,
    }
    if len(given) or len(given_held):
        training["prompts"] = {
            "trained": len(given),
            "held_out": len(given_held),
            "held_out_agreement": None if given_agreement is None else round(given_agreement, 4),
        }
    head_config = {
        "kind": HEAD_KIND,
        "format": HEAD_FORMAT,
        "target_fingerprint": target_fingerprint(reader),
        "hidden_size": cfg.hidden,
        "feature_layers": list(layers),
        "vocab_size": cfg.vocab_size,
        "training": training,
    }
    (out / HEAD_CONFIG).write_text(json.dumps(head_config, indent=2) + "\n")
    (out / "README.md").write_text(model_card(head_config, config))
    if held_agreement is not None:
        report(
            f"held-out agreement: the head guesses {held_agreement:.1%} of the target's greedy answer tokens "
            "(γ = 1, reading the target's features; chats it never trained on)"
        )
    if given_agreement is not None:
        report(f"on {len(given_held)} of your requests set aside (never trained on): {given_agreement:.1%}")
    return out


def _agreement(head: Any, subset: np.ndarray, store: SequenceStore) -> float | None:
    """The head's `answer_agreement` on the answers of `store`'s chats (None: it has none)."""
    from .train import answer_agreement

    if not len(store):
        return None
    pairs = store.load()
    tokens = [np.asarray(t, np.int64) for t, _ in pairs]
    starts = [item["prompt_tokens"] for item in store.items]
    return answer_agreement(head, subset, tokens, [f for _, f in pairs], starts)


def _distill_lm(
    target: str,
    out: Path,
    target_config: dict[str, Any],
    reader: Any,
    tokenizer_dir: Path,
    sequences: Sequence[Sequence[int]],
    held: SequenceStore,
    deadline: float,
    config: DistillConfig,
    report: Reporter,
) -> Path:
    """The small-LM kind: train it on the same sequences, measure it on the held-out answers, save it."""
    from .lm_draft import LMShape, lm_answer_agreement, new_lm, save_lm, train_lm

    shape = LMShape.for_target(reader.cfg.hidden)
    model = new_lm(target_config, reader.embedding(), shape)
    seconds = max(deadline - time.monotonic(), 10.0)
    report(
        f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter draft LM on "
        f"{sum(map(len, sequences)):,} tokens in {len(sequences)} sequences for {seconds / 60:.1f} min"
    )
    with _progress_bar(round(seconds), "s", "training") as bar:
        began = time.monotonic()

        def on_step(progress: Any, loss: float) -> None:
            if progress.steps % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                _advance(bar, began)

        progress = train_lm(model, [np.asarray(s, np.int64) for s in sequences], seconds, out, on_step=on_step)
    agreement = None
    if len(held):
        held_tokens = [np.asarray(item["tokens"], np.int64) for item in held.items]
        agreement = lm_answer_agreement(model, held_tokens, [item["prompt_tokens"] for item in held.items])
    training = {
        "target": str(target),
        "shape": asdict(shape),
        "sequences": len(sequences),
        "tokens": int(sum(map(len, sequences))),
        "tokens_seen": progress.tokens,
        "steps": progress.steps,
        "train_seconds": round(progress.seconds),
        "held_out_agreement": None if agreement is None else round(agreement, 4),
    }
    card = (
        "# Draft LM distilled by `ortspec distill --kind lm`\n\n"
        f"- Target: `{target}`; the target's own tokenizer\n"
        f"- Shape: {json.dumps(asdict(shape))}, tied embeddings (started from the target's, projected)\n"
        f"- Data: the target's own greedy chats and local text: {training['sequences']} sequences, "
        f"{training['tokens']:,} tokens; {training['tokens_seen']:,} tokens seen in {training['steps']} steps\n"
        f"- Held-out agreement (share of the target's greedy answer tokens guessed at γ = 1): {agreement}\n\n"
        "Use it: `ortspec export TARGET --draft THIS_DIR --out PACKAGE`.\n"
    )
    save_lm(model, tokenizer_dir, out, card, training)
    if agreement is not None:
        report(f"held-out agreement: the draft LM guesses {agreement:.1%} of the target's greedy answer tokens (γ = 1)")
    return out


def _layer_tensors(reader: Any, index: int) -> dict[str, np.ndarray]:
    """The target's layer `index` under transformers' LlamaDecoderLayer names (q/k/v unpadded)."""
    from .head_model import LAYER_PARTS

    ckpt, prefix = reader.ckpt, f"model.layers.{index}."
    return {name: ckpt.get(prefix + name) for name in LAYER_PARTS}


def model_card(head_config: dict[str, Any], config: DistillConfig) -> str:
    t = head_config["training"]
    return (
        "# Draft head (EAGLE-style) distilled by `ortspec distill`\n\n"
        f"- Target: `{t['target']}` (fingerprint `{head_config['target_fingerprint']}`; the head fits no other model)\n"
        "- Kind: one Llama decoder layer over [token embedding; target features"
        + (
            f"; the target's layers {', '.join(map(str, head_config['feature_layers']))}, RMS-normalised"
            if head_config.get("feature_layers")
            else ""
        )
        + "], "
        f"scoring the {t['vocab_subset']} most frequent tokens of its {t['vocab_source']} "
        f"({t['vocab_coverage']:.1%} of their tokens)\n"
        f"- Data: {t['data']}\n"
        f"- {t['sequences']} sequences, {t['tokens']:,} tokens; {t['tokens_seen']:,} tokens seen in "
        f"{t['steps']} steps ({t['train_seconds']} s of training); features from the {t['target_quantization']} "
        "export of the target\n"
        "- Held-out agreement (share of the target's greedy answer tokens guessed at γ = 1): "
        f"{t['held_out_agreement']}"
        + (
            f"; on {t['prompts']['held_out']} of the user's requests set aside: {t['prompts']['held_out_agreement']}"
            if t.get("prompts", {}).get("held_out")
            else ""
        )
        + f"\n- Settings: {json.dumps(asdict(config))}\n\n"
        "Use it: `ortspec export TARGET --draft THIS_DIR --out PACKAGE` puts target and head in one package.\n"
    )
