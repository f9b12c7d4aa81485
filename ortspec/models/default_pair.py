"""The embedded default pair: trained checkpoints shipped in ortspec/models/default, exported once
into a user cache directory and reused."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from ortspec.runtime.package.manifest import sha256_of
from ortspec.runtime.user_cache import cache_dir  # where exported packages are kept

from .. import __version__

SHIPPED = Path(__file__).parent / "default"
DEMO_PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(directory):\n",
]


def shipped_pair() -> tuple[Path, Path]:
    """(target, draft) checkpoint directories of the shipped pair."""
    target, draft = SHIPPED / "target", SHIPPED / "draft"
    if not (target / "config.json").is_file() or not (draft / "config.json").is_file():
        raise FileNotFoundError(f"the default pair is missing from {SHIPPED}; reinstall ortspec")
    return target, draft


# What the exported graphs look like: bump it when the builder changes them, so that packages cached
# by an earlier ortspec are exported afresh (2: the batch became a dynamic dimension, for batching;
# 3: a GGUF's Q8_0 weights stay at 8 bits in int4 exports, and a prompt's logits are scored at its
# last position only: `logits_to_keep`; 4: draft heads score only the last position of a catch-up).
GRAPH_REVISION = 4


def content_fingerprint(directories: tuple[Path, ...]) -> str:
    """Changes whenever the shipped weights, this ortspec version or its graphs' revision change."""
    digest = hashlib.sha256(f"{__version__} graphs {GRAPH_REVISION}".encode())
    for directory in directories:
        for file in sorted(directory.iterdir()):
            digest.update(file.name.encode())
            digest.update(sha256_of(file).encode())  # contents: a retrained pair keeps its file sizes
    return digest.hexdigest()[:12]


def export_once(out: Path, export: Callable[[], object], rebuild: bool, report: Callable[[str], None]) -> Path:
    """The cached package `out`, exported by `export()` unless it is there; when another process is
    exporting it right now (a second first run), wait for that one instead of failing."""
    from ..export.publish import ExportInProgressError

    waited = False
    while rebuild or not (out / "manifest.json").is_file():
        try:
            export()
            return out
        except ExportInProgressError:
            if not waited:
                report(f"another process is exporting {out}; waiting for it to finish")
            waited, rebuild = True, False  # what the other process writes is the rebuilt package
            time.sleep(0.5)
    return out


def default_package(quantize: str = "int4", rebuild: bool = False, report: Callable[[str], None] = print) -> Path:
    """The default pair as a deployment package, exported on first use (no torch needed: the builder)."""
    pair = shipped_pair()
    out = cache_dir() / f"default-{quantize}-{content_fingerprint(pair)}"

    def export() -> None:
        from ..export import export_pair

        report(f"exporting the default pair ({quantize}) into {out} (once; reused afterwards)")
        export_pair(pair[0], out, draft=pair[1], quantize=quantize, force=True, report=report)

    return export_once(out, export, rebuild, report)
