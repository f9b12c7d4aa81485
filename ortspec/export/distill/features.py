"""The target's final features for training sequences, computed by the exported target itself.

The head learns to continue the features of the graph it will draft for (the quantized ONNX
target), so they are read from that graph's `hidden_states` output, not from a PyTorch copy. A chat
gets its features while the target writes it (`greedy_answer`): the prompt's prefill and each
decode step already compute the features of the positions they feed, so nothing is read twice.
Local text is read once (`sequence_features`). Each sequence and its features are appended to a
`SequenceStore` together, so an interrupted run keeps what it finished, consistently.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ortspec.runtime.model.batching import BatchedModel, batch_problem
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.onnx_model import Model
from ortspec.runtime.package.manifest import TOKENIZER_CONFIG_FILE, load_manifest
from ortspec.runtime.pipeline import Pipeline
from ortspec.runtime.text.tokenizer import TextTokenizer

CHUNK = 256  # tokens per target call while reading a sequence


class FeatureStore:
    """features.bin (float16 rows, one per token) + features.json ([first row, rows] per sequence)."""

    def __init__(self, directory: Path, hidden: int) -> None:
        self.data_path = Path(directory) / "features.bin"
        self.index_path = Path(directory) / "features.json"
        self.hidden = hidden
        self.index: list[list[int]] = json.loads(self.index_path.read_text()) if self.index_path.is_file() else []
        self.truncate(len(self.index))  # rows written after the last index update: drop them

    def __len__(self) -> int:
        return len(self.index)

    def truncate(self, count: int) -> None:
        """Keep the first `count` sequences."""
        if count < len(self.index):
            self.index = self.index[:count]
            self._write_index()
        self._rows = self.index[-1][0] + self.index[-1][1] if self.index else 0
        if self.data_path.is_file() and self.data_path.stat().st_size > self._rows * self.hidden * 2:
            with open(self.data_path, "r+b") as f:
                f.truncate(self._rows * self.hidden * 2)

    def append(self, features: np.ndarray) -> None:
        with open(self.data_path, "ab") as f:
            f.write(np.ascontiguousarray(features, np.float16).tobytes())
        self.index.append([self._rows, len(features)])
        self._rows += len(features)
        self._write_index()

    def _write_index(self) -> None:
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        tmp.write_text(json.dumps(self.index))
        tmp.replace(self.index_path)

    def load(self) -> list[np.ndarray]:
        """One [length, hidden] float16 array per sequence (views of one memory map)."""
        if not self.index:
            return []
        data = np.memmap(self.data_path, dtype=np.float16, mode="r", shape=(self._rows, self.hidden))
        return [data[start : start + rows] for start, rows in self.index]


class SequenceStore:
    """A directory of sequences (items.jsonl: one JSON object with "tokens" per line) and their features.

    `append` writes the features first, then the item's line: on reopening, whatever has no partner
    (features without their line, a line cut short) is dropped, so items and features always match.
    """

    def __init__(self, directory: Path, hidden: int) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "items.jsonl"
        self.features = FeatureStore(directory, hidden)
        self.items: list[dict[str, Any]] = []
        text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        lines = text.splitlines()
        for line in lines[: len(self.features)]:
            try:
                self.items.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short: it and everything after it are dropped
        self.features.truncate(len(self.items))
        if len(lines) != len(self.items) or not text.endswith("\n"):  # also a last line without its newline
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(item) + "\n" for item in self.items), encoding="utf-8")
            tmp.replace(self.path)

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: dict[str, Any], features: np.ndarray) -> None:
        if len(features) != len(item["tokens"]):
            raise ValueError(f"{len(features)} feature rows for {len(item['tokens'])} tokens")
        self.features.append(features)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item) + "\n")
        self.items.append(item)

    def load(self) -> list[tuple[list[int], np.ndarray]]:
        """(tokens, [len(tokens), hidden] float16 features) per sequence."""
        return [(item["tokens"], f) for item, f in zip(self.items, self.features.load(), strict=True)]


def open_target(package: Path, threads: int | None, max_length: int, rows: int = 1) -> Pipeline:
    """The exported target as a pipeline whose target keeps its hidden_states output; with `rows` > 1
    (and a graph that batches), that many sequences at once share its one-token steps (`BatchedModel`)."""
    manifest = load_manifest(package, verify=False)
    target = Model.load(manifest.target, manifest.root, threads=threads, max_length=max_length, keep_hidden=True)
    tokenizer = TextTokenizer(manifest.tokenizer_json(), manifest.tokenizer_file(TOKENIZER_CONFIG_FILE))
    batch = BatchedModel(target, rows) if rows > 1 and batch_problem(target) is None else None
    return Pipeline(manifest, target, None, tokenizer, batch=batch)


def sequence_features(target: DecoderState, tokens: Sequence[int]) -> np.ndarray:
    """[len(tokens), hidden] final features of every position of `tokens`."""
    target.reset()
    parts = []
    for start in range(0, len(tokens), CHUNK):
        target.forward(tokens[start : start + CHUNK], last_only=True)  # the features are what it reads
        parts.append(target.hidden.copy())
    return np.concatenate(parts)


def greedy_answer(
    target: DecoderState, prompt: Sequence[int], max_new_tokens: int, eos_token_ids: Collection[int]
) -> tuple[list[int], np.ndarray]:
    """The target's greedy answer to `prompt` and the features of every position of prompt + answer.

    Decodes as `Pipeline.generate` does without a draft (one prefill call, then one token per step:
    the same calls, so the same tokens; it stops after an EOS id or `max_new_tokens`) and keeps the
    features each call computes. The answer's last token is never fed to choose a next one, so one
    more 1-token step reads it: every token gets its row, as from `sequence_features`, for one extra
    step per chat. The target must hold len(prompt) + max_new_tokens positions.

    The answer's rows come from 1-token calls; an int4 graph's 1-token kernel gives features that
    differ from a multi-token call's (serving's verify calls) by ~3% of their spread (SmolLM2-135M
    int4), a quarter of the noise training adds to the features anyway.
    """
    target.reset()
    logits = target.forward(prompt, last_only=True)
    parts = [target.hidden]  # a fresh array per call
    answer: list[int] = []
    while True:
        token = int(np.argmax(logits[-1]))
        answer.append(token)
        logits = target.forward([token])
        parts.append(target.hidden)
        if token in eos_token_ids or len(answer) >= max_new_tokens:
            return answer, np.concatenate(parts).astype(np.float16)
