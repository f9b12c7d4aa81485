"""The target's final features for training sequences, computed by the exported target itself.

The head learns to continue the features of the graph it will draft for (the quantized ONNX
target), so they are read from that graph's `hidden_states` output, not from a PyTorch copy. They
are appended as float16 rows to one file as they are computed, with a JSON index, so an interrupted
run keeps what it finished and a resumed one computes only what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...runtime.decoder import DecoderState, Model
from ...runtime.manifest import load_manifest

CHUNK = 256  # tokens per target call while reading a sequence


class FeatureStore:
    """features.bin (float16 rows, one per token) + features.json ([first row, rows] per sequence)."""

    def __init__(self, directory: Path, hidden: int) -> None:
        self.data_path = Path(directory) / "features.bin"
        self.index_path = Path(directory) / "features.json"
        self.hidden = hidden
        self.index: list[list[int]] = json.loads(self.index_path.read_text()) if self.index_path.is_file() else []
        rows = self.index[-1][0] + self.index[-1][1] if self.index else 0
        if self.data_path.is_file() and self.data_path.stat().st_size > rows * hidden * 2:
            with open(self.data_path, "r+b") as f:  # rows written after the last index update: drop them
                f.truncate(rows * hidden * 2)
        self._rows = rows

    def __len__(self) -> int:
        return len(self.index)

    def append(self, features: np.ndarray) -> None:
        with open(self.data_path, "ab") as f:
            f.write(np.ascontiguousarray(features, np.float16).tobytes())
        self.index.append([self._rows, len(features)])
        self._rows += len(features)
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        tmp.write_text(json.dumps(self.index))
        tmp.replace(self.index_path)

    def load(self) -> list[np.ndarray]:
        """One [length, hidden] float16 array per sequence (views of one memory map)."""
        if not self.index:
            return []
        data = np.memmap(self.data_path, dtype=np.float16, mode="r", shape=(self._rows, self.hidden))
        return [data[start : start + rows] for start, rows in self.index]


def open_feature_reader(package: Path, threads: int | None, max_length: int) -> DecoderState:
    """A sequence on the exported target, keeping its hidden_states output."""
    manifest = load_manifest(package, verify=False)
    model = Model.load(manifest.target, manifest.root, threads=threads, max_length=max_length, keep_hidden=True)
    return model.new_state()


def sequence_features(target: DecoderState, tokens: Sequence[int]) -> np.ndarray:
    """[len(tokens), hidden] final features of every position of `tokens`."""
    target.reset()
    parts = []
    for start in range(0, len(tokens), CHUNK):
        target.forward(tokens[start : start + CHUNK])
        parts.append(target.hidden.copy())
    return np.concatenate(parts)


def fill_features(
    store: FeatureStore,
    sequences: Sequence[Sequence[int]],
    target: DecoderState,
    on_sequence: Callable[[int], None] = lambda tokens: None,
) -> None:
    """Compute and store the features of every sequence the store does not hold yet (in order)."""
    for tokens in sequences[len(store) :]:
        store.append(sequence_features(target, tokens))
        on_sequence(len(tokens))
