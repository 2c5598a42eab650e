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


def _p2pd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _potluck_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "potluck.cli.main"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} - {os.getpid()}


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every server, bootstrap and p2pd a test starts must be gone when the session ends."""
    before_p2pd, before_potluck = _p2pd_pids(), _potluck_pids()
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = (_p2pd_pids() - before_p2pd) | (_potluck_pids() - before_potluck)
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
