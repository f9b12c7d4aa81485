"""The batched-verification study (benchmarks/batched_verify.py): a builder target graph whose attention runs
once per row at batch 1 gives every row of a shared call the logits of its verify alone, rows with different
numbers of new positions and idle row slots included."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_rows_of_a_shared_verify_get_their_logits_alone(package: Callable[..., Path], tmp_path: Path) -> None:
    from batched_verify import Buffers, load, row_split, split_call, today

    for source in (package("llama", draft=None, exporter="builder") / "target").iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    target, split_path = tmp_path / "model.onnx", tmp_path / "row_split3.onnx"  # beside the weights they share
    onnx.save(row_split(onnx.load(str(target), load_external_data=False), 3), str(split_path))
    plain, split = load(target, 1), load(split_path, 1)
    rng = np.random.default_rng(0)
    lengths = [9, 4, 0]
    ours, theirs = Buffers(plain, 3, 32), Buffers(plain, 3, 32)
    for r, length in enumerate(lengths[:2]):
        today(plain, ours, rng.integers(2, 300, size=(1, length)), [0], r)
    for a, b in zip(ours.arrays, theirs.arrays, strict=True):
        b[...] = a
    calls = {0: [5, 6, 7, 8], 1: [9]}  # row 2 idle: its slot attends a scratch position, its row stays as it was
    shared = split_call(split, theirs, 3, {r: (tokens, lengths[r]) for r, tokens in calls.items()})
    for r, tokens in calls.items():
        alone = today(plain, ours, np.array([tokens]), [lengths[r]], r)[0]
        np.testing.assert_allclose(shared[r], alone, rtol=0, atol=1e-5)
    for a, b in zip(ours.arrays, theirs.arrays, strict=True):  # the same entries written, in place, in each row
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
