"""Publishing a package: --force replaces only an ortspec package's own files, packages get the umask's
permissions, one export per --out at a time, and killed exports leave nothing that lingers."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.export import export_pair
from ortspec.export.publish import PackageExistsError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions, signals and locks")


def export(checkpoint, out: Path, **kwargs) -> list[str]:
    """Export the tiny llama (builder, unquantized) to `out`; return the lines it reported."""
    lines: list[str] = []
    export_pair(checkpoint("llama"), out, quantize=kwargs.pop("quantize", "none"), report=lines.append, **kwargs)
    return lines


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_force_refuses_a_directory_with_a_foreign_manifest(checkpoint, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 2}))
    (mine / "data.csv").write_text("a,b\n1,2\n")
    (mine / "src").mkdir()
    (mine / "src" / "app.js").write_text("console.log(1)")
    before = tree(mine)
    with pytest.raises(PackageExistsError, match="is not the manifest of an ortspec package"):
        export(checkpoint, mine, force=True)
    result = CliRunner().invoke(main, ["export", str(checkpoint("llama")), "--out", str(mine), "--force"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith("Error:") and "refusing to replace" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tree(mine) == before and hidden(tmp_path) == []


def test_force_replaces_only_the_files_the_package_wrote(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    export(checkpoint, out, draft=checkpoint("llama", "close"))
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer" / "extra.txt").write_text("mine too")
    (out / "calibration.json").write_text("{}")  # measured on the models being replaced
    export(checkpoint, out, quantize="int8", force=True)  # no draft this time
    assert (out / "notes.txt").read_text() == "mine" and (out / "tokenizer" / "extra.txt").read_text() == "mine too"
    assert not (out / "draft").exists() and not (out / "calibration.json").exists()
    pipe = ortspec.load(out)
    assert pipe.manifest.target.quantization["bits"] == 8 and pipe.manifest.draft is None
    assert hidden(tmp_path) == []


def test_force_refuses_a_manifest_that_lists_files_outside_the_package(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    export(checkpoint, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the package's")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["files"][0]["path"] = "../victim.txt"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageExistsError, match=r"'\.\./victim\.txt' leaves .* refusing to replace"):
        export(checkpoint, out, force=True)
    assert victim.read_text() == "not the package's" and (out / "target" / "model.onnx").is_file()


def test_force_does_not_overwrite_a_user_file_in_the_way(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    export(checkpoint, out)
    (out / "draft").mkdir()
    (out / "draft" / "model.onnx").write_text("my own model")
    with pytest.raises(PackageExistsError, match=r"draft/model\.onnx is not a file of the package there"):
        export(checkpoint, out, draft=checkpoint("llama", "close"), force=True)
    assert (out / "draft" / "model.onnx").read_text() == "my own model"
    ortspec.load(out)  # the old package is untouched
    assert hidden(tmp_path) == []


def test_packages_get_the_permissions_of_the_umask(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    previous = os.umask(0o022)
    try:
        export(checkpoint, out)
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
        assert modes and all(mode == (0o755 if p.is_dir() else 0o644) for p, mode in modes.items()), modes
        export(checkpoint, out, force=True)
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
        assert all(mode == (0o755 if p.is_dir() else 0o644) for p, mode in modes.items()), modes
    finally:
        os.umask(previous)


def test_a_second_export_to_the_same_out_fails_while_the_first_runs(checkpoint, tmp_path, monkeypatch):
    from ortspec.export import pair

    out = tmp_path / "pkg"
    started, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}
    prepare = pair.prepare_tokenizer

    def paused(*args, **kwargs):
        if threading.current_thread().name == "first":
            started.set()
            release.wait(timeout=30)
        return prepare(*args, **kwargs)

    def run(name: str) -> None:
        try:
            export(checkpoint, out)
            results[name] = "written"
        except PackageExistsError as exc:
            results[name] = exc

    monkeypatch.setattr(pair, "prepare_tokenizer", paused)
    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert started.wait(timeout=30)
    run("second")  # while the first is in the middle of its export
    release.set()
    first.join(timeout=60)
    assert results["first"] == "written"
    assert isinstance(results["second"], PackageExistsError)
    assert f"another export (pid {os.getpid()}) is writing" in str(results["second"])
    ortspec.load(out)
    assert hidden(tmp_path) == []


def test_an_out_filled_during_the_export_is_not_replaced(checkpoint, tmp_path, monkeypatch):
    from ortspec.export import pair

    out = tmp_path / "pkg"
    prepare = pair.prepare_tokenizer

    def someone_else_writes(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        return prepare(*args, **kwargs)

    monkeypatch.setattr(pair, "prepare_tokenizer", someone_else_writes)
    with pytest.raises(PackageExistsError, match="appeared during the export"):
        export(checkpoint, out)
    assert tree(out) == {"theirs.txt": b"theirs"} and hidden(tmp_path) == []


def test_leftovers_of_dead_exports_are_removed(checkpoint, tmp_path):
    dead, alive = dead_pid(), os.getppid()
    for name in (f".pkg.partial-{dead}-0badf00d", f".pkg.work-{dead}-1234abcd", f".pkg.partial-{alive}-00c0ffee"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / ".ortspec-work-abc123").mkdir()  # an older ortspec's, its owner unknown
    lines = export(checkpoint, tmp_path / "pkg")
    assert hidden(tmp_path) == [".ortspec-work-abc123", f".pkg.partial-{alive}-00c0ffee"]
    assert any(f".pkg.partial-{dead}-0badf00d, .pkg.work-{dead}-1234abcd" in line for line in lines), lines
    assert any("left alone" in line and ".ortspec-work-abc123" in line for line in lines), lines


STOPPED_EXPORT = """
import sys, time
from ortspec.export import pair
from ortspec.cli import main

def slow(*args, **kwargs):
    time.sleep(60)

pair.quantize_weights = slow
main(["export", sys.argv[1], "--out", sys.argv[2], "--quantize", "int4"])
"""


def test_sigterm_stops_an_export_without_leftovers(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED_EXPORT, str(checkpoint("llama")), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".pkg.partial-*")):
            assert child.poll() is None and time.monotonic() < deadline, "the export never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert list(tmp_path.iterdir()) == []
    assert child.returncode == 1 and "Aborted" in output, output  # click's answer to Ctrl-C


def test_a_second_first_run_of_the_cached_default_pair_waits_instead_of_failing(tmp_path, monkeypatch):
    """Two `ortspec demo` / `generate` first runs at once: the one that finds the export claimed waits."""
    from ortspec.export.publish import claim
    from ortspec.models.default_pair import default_package

    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "cache"))
    messages: list[str] = []
    outcome: list[object] = []

    def first_run() -> None:
        try:
            outcome.append(default_package("none", report=messages.append))
        except Exception as exc:  # the old behaviour: "another export is writing ..."
            outcome.append(exc)

    (tmp_path / "cache").mkdir()
    thread = threading.Thread(target=first_run)
    with claim(_expected_default_out("none"), "export"):  # another process holds the export of that package
        thread.start()
        deadline = time.monotonic() + 30
        while not any("waiting" in m for m in messages) and not outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not outcome, outcome  # neither failed nor finished while the claim is held
    thread.join(timeout=120)
    assert len(outcome) == 1 and isinstance(outcome[0], Path), outcome
    assert (outcome[0] / "manifest.json").is_file()


def _expected_default_out(quantize: str) -> Path:
    from ortspec.models.default_pair import cache_dir, content_fingerprint, shipped_pair

    return (cache_dir() / f"default-{quantize}-{content_fingerprint(shipped_pair())}").resolve()
