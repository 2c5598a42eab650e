"""Load balancing with real servers: they choose their own blocks and move to cover a hole left by a dead one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from potluck.cli.local_swarm import LocalSwarm
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.records import SwarmSnapshot, model_prefix_for
from potluck.swarm.transport import NodeOptions, SwarmNode

pytestmark = [pytest.mark.swarm, pytest.mark.chaos]

PERIOD = 2.0  # --balance-check-period for these tests
UPDATE = 1.0  # --update-period: records expire after max(2 * UPDATE, 3) seconds
EXPIRATION = 3.0


def _snapshot(peers: list[str], model_path: str) -> SwarmSnapshot:
    async def read() -> SwarmSnapshot:
        node = await SwarmNode.create(
            NodeOptions(initial_peers=tuple(peers), host="127.0.0.1", client_mode=True)
        )
        try:
            return await fetch_snapshot(node, model_prefix_for(model_path), 8)
        finally:
            await node.shutdown()

    return asyncio.run(read())


def _wait_for_coverage(
    peers: list[str], model_path: str, timeout: float, without: str | None = None
) -> tuple[SwarmSnapshot, float]:
    """Poll the DHT until every block has an online server (not counting ``without``)."""
    t0 = time.monotonic()
    while True:
        snap = _snapshot(peers, model_path)
        if without is not None:
            snap = snap.without([without])
        if not snap.missing_blocks():
            return snap, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"blocks {snap.missing_blocks()} still uncovered after {timeout:.0f}s")
        time.sleep(0.5)


def test_servers_choose_blocks_and_repair_a_hole(tiny_model_dir: Any, tmp_path: Any) -> None:
    model_path = str(tiny_model_dir("llama-gqa-llama3rope"))
    args = [
        "--num-blocks", "2", "--update-period", str(UPDATE), "--balance-check-period", str(PERIOD),
        "--start-delay-max", "3", "--throughput", "10",
    ]  # fmt: skip
    with LocalSwarm(tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_server(model_path, None, name=f"auto{i}", wait=False, extra_args=args)
            for i in range(5)
        ]
        swarm.wait_ready(procs)
        _wait_for_coverage(swarm.initial_peers, model_path, timeout=3 * PERIOD + EXPIRATION)
        status = subprocess.run(
            [sys.executable, "-m", "potluck.cli.main", "status", model_path, "--initial-peers", *swarm.initial_peers, "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["missing_blocks"] == []
        assert all(any(s["state"] == "online" for s in b["servers"]) for b in report["blocks"])

        # Kill a server that is the only holder of some block of its span.
        snap = _snapshot(swarm.initial_peers, model_path)
        coverage = snap.coverage()
        victim = next(p for p in procs if any(coverage[b] == 1 for b in range(*_span(snap, p.peer_id))))
        hole = [b for b in range(*_span(snap, victim.peer_id)) if coverage[b] == 1]
        swarm.kill(victim)
        # The dead server cannot announce: its records expire first, then a check period finds the hole.
        snap, took = _wait_for_coverage(
            swarm.initial_peers, model_path, timeout=EXPIRATION + 3 * PERIOD + 2, without=victim.peer_id
        )
        assert all(snap.coverage()[b] >= 1 for b in hole)
        moved = [p for p in procs if p is not victim and "rebalancing: moving" in p.log_tail(200)]
        assert moved, "no server moved to cover the hole"
        print(f"hole {hole} covered again {took:.1f}s after the kill by {[p.name for p in moved]}")


def _span(snap: SwarmSnapshot, peer_id: str) -> tuple[int, int]:
    s = snap.servers[peer_id]
    return s.start, s.end
