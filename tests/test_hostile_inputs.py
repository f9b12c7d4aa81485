"""Hostile inputs: folders a command does not own, concurrent runs, hostile heads, manifests and JSON,
read-only outputs and options without bounds each end in one line naming what is wrong, and nothing a
user owns is overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ortspec.export.distill import DistillConfig, distill
from ortspec.export.publish import ExportInProgressError, PackageExistsError, claim

QUICK = DistillConfig(minutes=0.05, quantize="none", vocab=64, held_out=0, threads=1)


def _cli(*args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`ortspec ARGS` in a fresh process where the modules `blocked` cannot be imported."""
    script = (
        "import importlib.abc, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is blocked in this test', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "from ortspec.cli import main\n"
        "main(sys.argv[1:], prog_name='ortspec')\n"
    )
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# distill's --out


def test_distill_refuses_a_folder_it_did_not_make(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """A user's folder (README.md, head.json of their own) is never written into; nothing in it changes."""
    for files in ({"README.md": "mine\n", "head.json": '{"mine": 1}'}, {"notes.txt": "mine"}):
        out = tmp_path / f"d{len(files)}"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        with pytest.raises(PackageExistsError, match="did not write"):
            distill(str(checkpoint("llama")), out, QUICK, report=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == sorted(files)
        assert all((out / name).read_text() == text for name, text in files.items())
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(PackageExistsError, match="not a directory"):
        distill(str(checkpoint("llama")), a_file, QUICK, report=lambda _: None)
    assert a_file.read_text() == "mine"


def test_a_second_distill_into_one_folder_fails_at_once(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """Two runs into one --out would interleave their data: the second is refused, naming the first's pid."""
    out = tmp_path / "head"
    running = claim(out.resolve(), "distill")  # a run in progress (another process would hold it the same way)
    with running, pytest.raises(ExportInProgressError, match=f"another distill \\(pid {os.getpid()}\\) is writing"):
        distill(str(checkpoint("llama")), out, QUICK, report=lambda _: None)
    assert not out.exists()


def test_distill_without_the_export_extras_is_one_line(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    result = _cli("distill", str(checkpoint("llama")), "--out", str(tmp_path / "head"), blocked=("torch",))
    _one_line_error(result, "needs the export extras", "torch is missing")
    assert not (tmp_path / "head").exists()
