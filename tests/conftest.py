"""Shared test setup: tiny checkpoints on sys.path, local swarms that always stop, and a leak check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


# Every process this test session starts inherits this marker, so the leak check counts only our own
# processes (another test run on the same machine may have servers of its own).
RUN_MARKER = f"POTLUCK_TEST_RUN={os.getpid()}-{time.time_ns()}"
os.environ["POTLUCK_TEST_RUN"] = RUN_MARKER.split("=", 1)[1]


def _ours(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return RUN_MARKER.encode() in f.read().split(b"\0")
    except OSError:  # gone, or not readable: not a leftover of ours
        return False


def _pids(args: list[str]) -> set[int]:
    out = subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} - {os.getpid()}


def _our_leftovers() -> set[int]:
    return {pid for pid in _pids(["-x", "p2pd"]) | _pids(["-f", "potluck"]) if _ours(pid)}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every server, bootstrap and p2pd a test starts must be gone when the session ends."""
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = _our_leftovers()
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left behind by the tests: {sorted(left)}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny_model_dir(kind)`` -> a saved tiny checkpoint (see tiny_models.py), built once per session."""
    from tiny_models import make_tiny_model

    made: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{kind}")
            made[kind] = make_tiny_model(kind, str(Path(path)))
        return made[kind]

    return get
