"""Where calibrations are kept: hostile names in a package, damaged files, read-only packages, concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.runtime.speculation import calibration_store
from ortspec.runtime.speculation.calibration import Calibration
from ortspec.runtime.speculation.calibration_store import CALIBRATION_FILE, read_calibrations, save_calibration


def timings(key: str, max_gamma: int = 8, step_ms: float = 1.0) -> Calibration:
    """A calibration as `measure` returns it, at a single context (no time spent measuring)."""
    return Calibration(
        key, [64], [[step_ms * (1 + n / 10) for n in range(max_gamma + 1)]], [0.5], [[1.0] * max_gamma], [2.0]
    )


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def measured(monkeypatch) -> list[str]:
    """Stands in for measuring (seconds of timing): the keys measured, in order."""
    keys: list[str] = []

    def fake(target, draft, key, max_gamma=8, *args, **kwargs):
        keys.append(key)
        return timings(key, max_gamma)

    monkeypatch.setattr("ortspec.runtime.pipeline.measure", fake)
    return keys


@pytest.fixture
def root(package, tmp_path) -> Path:
    """A writable copy of a package with a draft model, without the calibrations other tests stored in it."""
    shutil.copytree(package("llama", draft="close"), tmp_path / "pkg", ignore=shutil.ignore_patterns("calibration.*"))
    return tmp_path / "pkg"


def generate(root: Path, messages: list[str] | None = None) -> None:
    pipe = ortspec.load(root)
    if messages is not None:
        pipe.on_calibrate = messages.append
    pipe.generate([5, 6, 7], max_new_tokens=4)  # draft_tokens="auto" by default: calibrates first


def cached_files(user_cache: Path) -> list[Path]:
    return sorted(user_cache.glob("calibrations/*.json"))


@pytest.mark.parametrize("name", [CALIBRATION_FILE + ".tmp", CALIBRATION_FILE, CALIBRATION_FILE + ".lock"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_hostile_names_in_the_package_are_never_followed_or_opened(root, tmp_path, user_cache, measured, name, kind):
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    key = ortspec.load(root)._calibration_key
    victim = tmp_path / "victim.json"  # a file of the user's; it even holds a calibration for this key
    victim.write_text(json.dumps({"calibrations": [asdict(timings(key))]}))
    before = victim.read_bytes()
    planted = root / name
    if kind == "symlink":
        planted.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.mkdir()

    errors: list[BaseException] = []
    messages: list[str] = []
    thread = threading.Thread(target=_capture(lambda: generate(root, messages), errors), daemon=True)
    thread.start()
    thread.join(timeout=60)
    hung = thread.is_alive()
    if hung and kind == "fifo":  # let the stuck writer go before failing
        os.close(os.open(planted, os.O_RDONLY | os.O_NONBLOCK))
    assert not hung, f"generation hung on a {kind} named {name}"
    assert not errors, errors
    assert victim.read_bytes() == before
    assert measured == [key], "a calibration was read through the symlink"
    assert (name == CALIBRATION_FILE) == any(m.startswith(f"ignoring {planted}: ") for m in messages), messages
    if name.endswith(".tmp"):  # a name the fix never uses
        assert [c.key for c in read_calibrations(root / CALIBRATION_FILE)] == [key]
    else:  # the file or its lock unusable: kept in the user cache instead
        assert len(cached_files(user_cache)) == 1
    generate(root, messages)
    assert measured == [key], "measured again on the next start"


def _capture(work, errors: list[BaseException]):
    def run() -> None:
        try:
            work()
        except BaseException as error:  # reported by the test in its own thread
            errors.append(error)

    return run


def damaged(key: str) -> list[bytes]:
    """calibration.json contents that must be reported and measured again, not crash a generation."""
    good = asdict(timings(key))
    entries = [
        good | {"target_ms": [[0.0] * 9]},  # a zero timing
        good | {"round_ms": [[0.0] * 8]},
        good | {"target_ms": [[float("nan")] * 9]},
        good | {"target_ms": [[1.0, 2.0], [1.0]]},  # ragged
        good | {"contexts": [64, 32], "target_ms": [[1.0] * 9] * 2, "draft_ms": [0.5] * 2},  # not increasing
        good | {"contexts": [True]},
        good | {"draft_ms": "fast"},
        good | {"extra": 1},
        {k: v for k, v in good.items() if k != "draft_ms"},
        [good],
        None,
    ]
    return [json.dumps({"calibrations": [entry]}).encode() for entry in entries] + [
        b'{"calibrations": {"key": 1}}',  # the wrong shape
        b"[1, 2]",
        b'{"calibrations": "none"}',
        b"\xff\xfe{}",  # not UTF-8
        b"{",
        b"[" * 100_000,
        b" " * (calibration_store.MAX_FILE_BYTES + 1),
    ]


def test_damaged_calibration_is_reported_measured_again_and_repaired(root, measured):
    key = ortspec.load(root)._calibration_key
    path = root / CALIBRATION_FILE
    for contents in damaged(key):
        path.write_bytes(contents)
        messages: list[str] = []
        generate(root, messages)
        assert len([m for m in messages if m.startswith(f"ignoring {path}")]) == 1, (contents[:80], messages)
        assert measured[-1] == key
        assert [c.key for c in read_calibrations(path)] == [key]  # repaired in place
    count = len(measured)
    assert count == len(damaged(key))
    generate(root)
    assert len(measured) == count


def test_damaged_calibration_warns_library_users(root, measured):
    (root / CALIBRATION_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.warns(RuntimeWarning, match=f"ignoring {root / CALIBRATION_FILE}: not UTF-8"):
        generate(root)
    assert len(measured) == 1


def test_calibrate_command_repairs_a_damaged_file(root, measured):
    path = root / CALIBRATION_FILE
    key = ortspec.load(root)._calibration_key
    for contents in [*damaged(key)[:3], b"\xff\xfe{}", b'{"calibrations": {"key": 1}}']:
        path.write_bytes(contents)
        result = CliRunner().invoke(main, ["calibrate", str(root), "--max-gamma", "4"])
        assert result.exit_code == 0, result.output
        assert f"stored in {path}" in result.output
        (stored,) = read_calibrations(path)
        assert stored.key == key and stored.max_gamma == 4


@pytest.fixture
def read_only(root, monkeypatch) -> Path:
    """`root`'s directory refuses new files (as a chmod would for a user other than root)."""
    write = calibration_store._write_atomically

    def refuse(path: Path, text: str) -> None:
        if path.parent == root:
            raise PermissionError(13, "Permission denied", str(path.parent))
        write(path, text)

    monkeypatch.setattr(calibration_store, "_write_atomically", refuse)
    return root


def test_read_only_package_keeps_its_calibration_in_the_user_cache(read_only, user_cache, measured):
    messages: list[str] = []
    generate(read_only, messages)
    (cached,) = cached_files(user_cache)
    assert f"calibration stored in {cached}" in messages
    assert not (read_only / CALIBRATION_FILE).exists()
    generate(read_only)
    assert len(measured) == 1, "a read-only package was measured again on the next start"

    result = CliRunner().invoke(main, ["calibrate", str(read_only), "--max-gamma", "4"])
    assert result.exit_code == 0, result.output
    assert f"stored in {cached}" in result.output and str(read_only / CALIBRATION_FILE) not in result.output
    assert [c.max_gamma for c in read_calibrations(cached)] == [4]


def test_nowhere_to_store_is_said_and_fails_calibrate(read_only, tmp_path, monkeypatch, measured):
    (tmp_path / "blocker").write_text("a file where the cache directory would go")
    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "blocker" / "cache"))
    result = CliRunner().invoke(main, ["calibrate", str(read_only), "--max-gamma", "4"])
    assert result.exit_code != 0
    assert "could not store the calibration" in result.output
    assert not [line for line in result.output.splitlines() if line.startswith(("stored in", "calibration stored"))]
    with pytest.warns(RuntimeWarning, match="could not store the calibration"):
        generate(read_only)


def test_chmod_read_only_package(root, user_cache, measured):
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the monkeypatched tests above cover it)")
        generate(root)
        generate(root)
        assert len(measured) == 1 and len(cached_files(user_cache)) == 1
    finally:
        os.chmod(root, 0o755)


def test_concurrent_saves_keep_every_entry_and_readers_see_whole_files(tmp_path):
    path, writers, saves = tmp_path / CALIBRATION_FILE, 8, 20
    problems: list[BaseException] = []
    done = threading.Event()

    def write(writer: int) -> None:
        for save in range(saves):
            save_calibration([path], timings(f"key {writer}/{save}", max_gamma=2))

    def read() -> None:
        while not done.is_set():
            if path.exists():
                json.loads(path.read_bytes().decode("utf-8"))  # a half-written file raises

    threads = [threading.Thread(target=_capture(lambda w=w: write(w), problems)) for w in range(writers)]
    reader = threading.Thread(target=_capture(read, problems))
    for thread in [reader, *threads]:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert not problems, problems[:3]
    stored = {c.key for c in read_calibrations(path)}
    assert stored == {f"key {w}/{s}" for w in range(writers) for s in range(saves)}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
