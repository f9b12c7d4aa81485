"""The user's cache directory: exported default packages, and calibrations of packages that cannot hold their own."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ORTSPEC_CACHE, else $XDG_CACHE_HOME/ortspec or ~/.cache/ortspec."""
    if os.environ.get("ORTSPEC_CACHE"):
        return Path(os.environ["ORTSPEC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ortspec"
