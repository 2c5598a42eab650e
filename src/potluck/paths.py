"""Where potluck keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$POTLUCK_CACHE`` or ``~/.cache/potluck``: made models, measured throughput."""
    return Path(os.environ.get("POTLUCK_CACHE", Path.home() / ".cache" / "potluck"))
