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


def test_generate_and_status_commands_on_a_model_with_a_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`potluck generate` streams text from the swarm; `potluck status` prints the table."""
    from potluck.cli.local_swarm import LocalSwarm
    from potluck.cli.sample_models import demo_model_path

    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))  # made from scratch, with its tokenizer
    env = dict(os.environ)
    path = demo_model_path()
    with LocalSwarm(tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.wait_ready(
            [swarm.start_server(path, (0, 5), wait=False), swarm.start_server(path, (5, 8), wait=False)]
        )
        base = [sys.executable, "-m", "potluck.cli.main"]
        peers = ["--initial-peers", *swarm.initial_peers, "--host", "127.0.0.1"]
        gen = subprocess.run(
            [*base, "generate", path, *peers, "--prompt", "Hello swarm", "--max-new-tokens", "12"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert gen.stdout.startswith("Hello swarm") and len(gen.stdout.strip()) > len("Hello swarm")
        assert "12 tokens in" in gen.stderr
        spec = subprocess.run(
            [*base, "generate", path, *peers, "--prompt", "Hello swarm", "--max-new-tokens", "12", "--draft", path],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert spec.returncode == 0, spec.stderr[-2000:]
        assert (
            spec.stdout == gen.stdout
        )  # greedy: the draft (here the model itself) changes nothing but speed
        assert "tokens per round trip, 100% of proposals accepted" in spec.stderr
        status = subprocess.run(
            [*base, "status", path, *peers], capture_output=True, text=True, timeout=120, env=env
        )
        assert status.returncode == 0, status.stderr[-2000:]
        assert "all blocks are covered" in status.stdout and "0:5" in status.stdout and "5:8" in status.stdout
