"""``potluck demo`` end to end: a real local swarm, one failover, the same text as a local run, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm


def test_demo_completes_with_a_failover_and_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "POTLUCK_CACHE": str(tmp_path / "cache")}  # builds the demo model from scratch
    proc = subprocess.run(
        [sys.executable, "-m", "potluck.cli.main", "demo"],
        capture_output=True,
        text=True,
        timeout=120,  # the demo must finish within two minutes on a 2-core machine
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "killing server" in output and "1 failover(s)" in output, output[-4000:]
    assert "swarm output equals a local run of the same model: yes" in output
    assert "all blocks are covered" in output
    # The session-wide leak check (tests/conftest.py) also verifies no p2pd or server outlived the demo.
