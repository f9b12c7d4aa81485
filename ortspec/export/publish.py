"""Publish a package directory: one export per `--out` at a time, built aside, moved into place when complete.

An export claims `--out` with a lock file beside it (`.NAME.lock`, flock: the kernel drops it when the
process dies), builds the package in `.NAME.partial-<pid>-<random>` (scratch files in
`.NAME.work-<pid>-<random>`) and moves it to `--out` only at the end. SIGTERM stops an export the way
Ctrl-C does, so both clean up; what SIGKILL leaves is removed by the next export to the same name once
the pid in its name is dead. `--force` replaces only an ortspec package it recognises, and only the
files that package wrote: anything else in the directory stays.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ortspec.runtime.errors import PackageError
from ortspec.runtime.package.json_file import read_json
from ortspec.runtime.package.manifest import FORMAT_NAME, MANIFEST_FILE, READABLE_VERSIONS, parse_manifest
from ortspec.runtime.speculation.calibration_store import CALIBRATION_FILE

Reporter = Callable[[str], None]


class PackageExistsError(FileExistsError):
    """`--out` is taken: by something that may not be replaced, or by another export running now."""


class ExportInProgressError(PackageExistsError):
    """Another export is writing `--out` right now (it holds the claim)."""


@contextmanager
def staging_directory(out: str | Path, force: bool, report: Reporter = print) -> Iterator[tuple[Path, Path]]:
    """(package directory, scratch directory), hidden siblings of `out`; the package becomes `out` if the block
    finishes without error, and both are removed whatever happens."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out, "export"), _sigterm_as_interrupt():
        _remove_dead_leftovers(out, report)
        _replaceable_files(out, force)  # refuse before the work rather than after it
        made: list[Path] = []
        try:
            made.append(_fresh_dir(out, "partial", 0o777))  # the package: what `cp -r` would make under the umask
            made.append(_fresh_dir(out, "work", 0o700))
            yield made[0], made[1]
            _publish(made[0], out, _replaceable_files(out, force) if force else None)
        finally:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def claim(out: Path, command: str) -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` while `command` (export, distill) writes it (POSIX), so a second command
    writing `out` fails at once, naming the first and its pid."""
    if os.name != "posix":
        yield
        return
    import fcntl

    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").split()  # "PID COMMAND"
            os.close(fd)
            pid = f" (pid {holder[0]})" if holder else ""
            other = holder[1] if len(holder) > 1 else "export"
            raise ExportInProgressError(
                f"another {other}{pid} is writing {out} right now; wait for it to end or choose another --out"
            ) from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # its last holder removed it after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}".encode())
        yield
    finally:
        os.unlink(lock)  # while still holding it, so that a waiting export retries on a fresh file
        os.close(fd)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM raise KeyboardInterrupt like Ctrl-C, so a terminated export cleans up (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _fresh_dir(out: Path, kind: str, mode: int) -> Path:
    """A new `.NAME.KIND-<pid>-<random>` beside `out`: the pid tells later exports whether its owner still runs."""
    while True:
        path = out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir(mode)
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (assumed where it cannot be checked)."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _remove_dead_leftovers(out: Path, report: Reporter) -> None:
    """Delete what killed exports to `out` left beside it, once their pid is dead; name the older leftovers
    whose owner cannot be told (their names carry no pid)."""
    name = re.escape(out.name)
    ours = re.compile(rf"\.{name}\.(?:partial|work)-(\d+)-[0-9a-f]+")
    older = re.compile(rf"\.{name}\.(?:partial|old)-.+|\.ortspec-work-.+")
    removed, unknown = [], []
    for entry in sorted(out.parent.iterdir()):
        match = ours.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif not match and older.fullmatch(entry.name):
            unknown.append(entry.name)
    if removed:
        report(f"removed what killed exports left in {out.parent}: {', '.join(removed)}")
    if unknown:
        report(
            f"left alone in {out.parent}, from interrupted exports of an older ortspec: {', '.join(unknown)}; "
            "delete them if no export is running"
        )


def _replaceable_files(out: Path, force: bool) -> set[Path] | None:
    """None when `out` is free (missing or empty); else, with `force`, the files of the ortspec package there."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PackageExistsError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return None
    if not force:
        raise PackageExistsError(f"{out} already exists; pass --force to replace it")
    return _package_files(out)


def _package_files(out: Path) -> set[Path]:
    """What the ortspec package at `out` wrote: its manifest, the files it lists and its calibration (measured
    on the models being replaced). Anything that is not provably such a package is refused."""
    manifest = out / MANIFEST_FILE
    refusing = f"refusing to replace {out}"
    if not manifest.is_file():
        raise PackageExistsError(f"{out} exists and is not an ortspec package (no {MANIFEST_FILE}); {refusing}")
    try:
        data = read_json(manifest)
    except ValueError:
        data = None
    kind, version = (data.get("format"), data.get("format_version")) if isinstance(data, dict) else (None, None)
    if kind != FORMAT_NAME or version not in READABLE_VERSIONS:
        raise PackageExistsError(
            f"{manifest} is not the manifest of an ortspec package (format {kind!r}, version {version!r}); {refusing}"
        )
    try:
        listed = [entry.path for entry in parse_manifest(data, out).all_files()]
    except (PackageError, TypeError, AttributeError) as exc:
        raise PackageExistsError(f"{manifest} is malformed ({exc}); {refusing}") from exc
    files = {_inside(out, path) for path in [*listed, MANIFEST_FILE]}
    calibration = out / CALIBRATION_FILE
    if calibration.is_file() and not calibration.is_symlink():
        files.add(calibration)
    return files


def _inside(root: Path, relative: str) -> Path:
    """`root / relative`, refused if it leaves `root` or passes through a link (replacing must touch only `root`)."""
    path = Path(os.path.normpath(root / relative))
    if path == root or not path.is_relative_to(root) or path.resolve() != path:
        raise PackageExistsError(f"{relative!r} leaves {root} or is a link; refusing to replace {root}")
    return path


def _publish(staging: Path, out: Path, owned: set[Path] | None) -> None:
    """Move the finished package to `out`: one rename when nothing is to be replaced (`owned` is None), else file
    by file over the old package's files `owned`, the manifest last (until then the old one stands, failing its
    checksums)."""
    if owned is None:
        try:
            staging.rename(out)  # atomic: it replaces at most an empty directory
        except OSError as exc:
            raise PackageExistsError(
                f"{out} appeared during the export, written by something else; left it as is"
            ) from exc
        return
    files = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()), key=_manifest_last)
    moves = [(staging / relative, _inside(out, relative)) for relative in files]
    for _, dest in moves:
        if _in_the_way(dest, out, owned):
            raise PackageExistsError(
                f"{dest} is not a file of the package there, and is in the way; refusing to replace {out}"
            )
    for source, dest in moves:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
    for path in owned - {dest for _, dest in moves}:
        if path.is_file():
            path.unlink()
        for parent in path.parents:  # the directories it leaves empty
            if parent == out:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty
                break


def _in_the_way(dest: Path, out: Path, owned: set[Path]) -> bool:
    """Whether moving a file to `dest` would overwrite or displace something the old package did not write."""
    if os.path.lexists(dest) and (dest not in owned or not dest.is_file()):
        return True
    return any(p.exists() and not p.is_dir() for p in dest.parents if p != out and p.is_relative_to(out))


def _manifest_last(relative: str) -> tuple[bool, str]:
    return relative == MANIFEST_FILE, relative
