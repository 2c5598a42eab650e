"""Where potluck keeps files between runs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$POTLUCK_CACHE`` or ``~/.cache/potluck``: made models, measured throughput, resolved configs."""
    return Path(os.environ.get("POTLUCK_CACHE", Path.home() / ".cache" / "potluck"))


def write_json_atomically(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so processes starting together
    never read a half-written file. Raises ``OSError``; the temporary file does not outlive a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
