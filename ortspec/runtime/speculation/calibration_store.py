"""Where calibrations are kept, and reading them back safely.

A package's calibrations live beside its manifest (`calibration.json`, one entry per key); a package
whose directory cannot take them (read-only, or holding something other than a regular file under
that name) keeps them in the user cache, under a name derived from its manifest. A package may come
from anyone, so nothing it holds is trusted: no name is followed if it is a symlink or opened if it
is not a regular file, a write goes to a fresh temporary file that replaces the target at once
(readers see the old file or the new one), concurrent writers merge under a lock, and a stored
entry is checked before the speedup model sees it (a zero timing divides by zero).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ortspec.runtime.errors import CalibrationFileError
from ortspec.runtime.package.manifest import Manifest
from ortspec.runtime.speculation.calibration import Calibration
from ortspec.runtime.user_cache import cache_dir

if sys.platform != "win32":  # Windows has no fcntl: writers are not serialised there (a lost entry is measured again)
    import fcntl

CALIBRATION_FILE = "calibration.json"
MAX_FILE_BYTES = 1 << 20  # an entry takes a few KB: a larger file is not one of ours
FIELDS = {f.name for f in fields(Calibration)}


def calibration_files(manifest: Manifest) -> list[Path]:
    """Where a package's calibrations are looked for and stored, in order: beside its manifest, then
    in the user cache under a digest of the manifest (which lists every file's sha256)."""
    digest = hashlib.sha256(manifest.to_json().encode()).hexdigest()[:16]
    return [manifest.root / CALIBRATION_FILE, cache_dir() / "calibrations" / f"{digest}.json"]


def load_calibration(
    files: Sequence[Path], key: str, max_gamma: int, warn: Callable[[str], None]
) -> Calibration | None:
    """The first stored calibration for `key` covering γ up to `max_gamma`; files that cannot be used are
    reported to `warn` (one line each) and skipped."""
    for path in files:
        try:
            for calibration in read_calibrations(path):
                if calibration.key == key and calibration.max_gamma >= max_gamma:
                    return calibration
        except CalibrationFileError as error:
            warn(f"ignoring {error}")
    return None


def save_calibration(files: Sequence[Path], calibration: Calibration) -> Path:
    """Store `calibration` (replacing its key's entry) in the first of `files` that can take it; where it went.
    Raises OSError naming every failure when none can."""
    failures = []
    for path in files:
        try:
            _merge(path, calibration)
            return path
        except OSError as error:
            failures.append(str(error))
    raise OSError("; ".join(failures))


def read_calibrations(path: Path) -> list[Calibration]:
    """The calibrations stored at `path` (none if it does not exist), read without following a symlink,
    blocking on a FIFO or reading more than MAX_FILE_BYTES, each entry checked."""
    _refuse_special(path, CalibrationFileError)
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nofollow)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:
        raise CalibrationFileError(f"{path}: cannot be read ({error.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise CalibrationFileError(f"{path}: not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CalibrationFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CalibrationFileError(f"{path}: not UTF-8 JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("calibrations"), list):
        raise CalibrationFileError(f'{path}: not an object with a "calibrations" list')
    try:
        return [_checked(entry) for entry in document["calibrations"]]
    except ValueError as error:
        raise CalibrationFileError(f"{path}: {error}") from None


def _refuse_special(path: Path, error: type[Exception]) -> None:
    """Raise `error` if `path` exists and is not a regular file (a symlink, FIFO, directory...)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise error(f"{path}: {kind}; not followed")


def _checked(entry: object) -> Calibration:
    """A stored entry as a Calibration, if it has the shape `measure` writes: positive finite timings
    (draft steps may be 0 without a draft model), one row per context, rows as long as γ allows."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not set(entry) <= FIELDS:
        raise ValueError(f"an entry is not a calibration (fields {sorted(FIELDS)}, key a string)")
    contexts = entry.get("contexts")
    if not isinstance(contexts, list) or not contexts or not all(type(c) is int and c > 0 for c in contexts):
        raise ValueError(f"{entry['key']!r}: contexts must be positive integers")
    if contexts != sorted(set(contexts)):
        raise ValueError(f"{entry['key']!r}: contexts must increase")
    target_ms = entry.get("target_ms")
    width = len(target_ms[0]) if isinstance(target_ms, list) and target_ms and isinstance(target_ms[0], list) else 0
    rounds, catch_up = entry.get("round_ms", []), entry.get("catch_up_ms", [])
    try:
        return Calibration(
            entry["key"],
            contexts,
            _timings(target_ms, (len(contexts), max(width, 1)), "target_ms"),
            _timings(entry.get("draft_ms"), (len(contexts),), "draft_ms", zero=not rounds),
            _timings(rounds, (len(contexts), width - 1), "round_ms") if rounds else [],
            _timings(catch_up, (len(contexts),), "catch_up_ms") if catch_up else [],
        )
    except ValueError as error:
        raise ValueError(f"{entry['key']!r}: {error}") from None


def _timings(value: object, shape: tuple[int, ...], name: str, zero: bool = False) -> list[Any]:
    """`value` as nested lists of that shape holding finite ms > 0 (or ≥ 0 with `zero`)."""
    if not isinstance(value, list) or len(value) != shape[0]:
        raise ValueError(f"{name} must be a list of {shape[0]} {'rows' if len(shape) > 1 else 'timings'}")
    if len(shape) > 1:
        return [_timings(row, shape[1:], name, zero) for row in value]
    for t in value:
        if type(t) not in (int, float) or not math.isfinite(t) or t < 0 or (t == 0 and not zero):
            raise ValueError(f"{name} holds {t!r}, not a {'non-negative' if zero else 'positive'} finite ms")
    return [float(t) for t in value]


def _merge(path: Path, calibration: Calibration) -> None:
    """Re-read `path` under its lock, replace `calibration`'s key and write the result at once.
    A damaged file is replaced; a name that is not a regular file is left alone (OSError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _refuse_special(path, OSError)
        try:
            entries = [asdict(c) for c in read_calibrations(path) if c.key != calibration.key]
        except CalibrationFileError:
            entries = []
        _write_atomically(path, json.dumps({"calibrations": [*entries, asdict(calibration)]}, indent=1) + "\n")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path`.lock (a regular file, never followed if a symlink) meanwhile."""
    if sys.platform == "win32":
        yield
        return
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)  # a FIFO opens at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{lock}: not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`: written to a fresh temporary name beside it (created
    exclusively, so never a name the package already holds), then renamed over it."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from the package's other users
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
