"""The command line against a real swarm started with `serve --new-swarm` (no bootstrap): start-up messages,
status (plural forms, dead servers, the models listing), generate flags, missing blocks, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from potluck.cli.local_swarm import LocalSwarm, SwarmProcess

pytestmark = pytest.mark.swarm

# a mistake is reported within this long, start-up included: half the default --wait-for-servers (60 s), so a
# command that waited the default fails; start-up alone (torch, transformers, hivemind imports) took 8-11 s on a
# slow 2-core VM
DEADLINE = 30.0
CLI = [sys.executable, "-m", "potluck.cli.main"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from potluck.cli.sample_models import demo_model_path

    root = tmp_path_factory.mktemp("cli-swarm")
    old = os.environ.get("POTLUCK_CACHE")
    os.environ["POTLUCK_CACHE"] = str(root / "cache")  # the demo model (it has a tokenizer), made here
    try:
        path = demo_model_path()
        with LocalSwarm(root / "logs") as local:
            # Neither --blocks nor --num-blocks: as many blocks as fit (all 8 of this small model).
            first = local.start_first_server(path, name="first", extra_args=["--start-delay-max", "0"])
            yield {"swarm": local, "path": path, "first": first, "peers": local.initial_peers}
    finally:
        if old is None:
            os.environ.pop("POTLUCK_CACHE", None)
        else:
            os.environ["POTLUCK_CACHE"] = old


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _peers(swarm: dict[str, Any]) -> list[str]:
    return ["--initial-peers", *swarm["peers"]]


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode != 0:
            return True
        time.sleep(0.2)
    return False


def test_new_swarm_server_fills_memory_shows_progress_and_how_to_join(swarm: dict[str, Any]) -> None:
    first: SwarmProcess = swarm["first"]
    assert (first.info["start"], first.info["end"]) == (0, 8)  # auto-sized: all blocks fit
    log = first.log_path.read_text()
    assert "serving 8 blocks" in log and "started a new swarm" in log
    assert "loading blocks 0:8" in log and "8/8" in log  # the tqdm bar over blocks
    for maddr in first.maddrs:
        assert f"join this swarm with: --initial-peers {maddr}" in log


def test_generate_do_sample_without_top_p(swarm: dict[str, Any]) -> None:
    proc = _run("generate", swarm["path"], *_peers(swarm), "--prompt", "Hi", "--do-sample", "--seed", "3",
                "--max-new-tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 tokens in" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_blocks_name_the_blocks_and_the_wait(swarm: dict[str, Any]) -> None:
    t0 = time.monotonic()
    proc = _run("generate", swarm["path"], *_peers(swarm), "--prompt", "Hi", "--model-prefix", "nobody-serves",
                "--wait-for-servers", "1", timeout=DEADLINE)  # fmt: skip
    assert time.monotonic() - t0 < DEADLINE
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "potluck generate: error: no server serves blocks 0-7 of nobody-serves (waited 1s"
    ), last
    assert "potluck serve MODEL --blocks" in last


def test_status_counts_servers_lists_models_and_shows_dead_ones(swarm: dict[str, Any]) -> None:
    local: LocalSwarm = swarm["swarm"]
    first: SwarmProcess = swarm["first"]
    prefix = Path(swarm["path"]).name.replace(".", "-")
    # Without a model: the models the swarm serves (from the servers' announcements).
    proc = _run("status", *_peers(swarm))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[:2] == [
        "this swarm serves 1 model:",
        f"  {prefix}: 8 blocks, 1 server online, all blocks covered",
    ]
    proc = _run("status", prefix, *_peers(swarm), "--json")  # a DHT name: no checkpoint needed
    report = json.loads(proc.stdout)
    assert report["serving"] == 1 and report["missing_blocks"] == []
    (server,) = report["servers"]
    assert server["peer_id"] == first.peer_id and server["status"] == "online"  # the full peer id
    assert server["maddrs"] == first.maddrs and server["version"] == "0.1.0" and server["adapters"] == []
    # A second server, then its machine vanishes: its record outlives it (600 s here), status must not count it.
    doomed = local.start_server(
        swarm["path"], (0, 2), name="doomed", extra_args=["--public-name", "doomed", "--update-period", "300"]
    )
    proc = _run("status", swarm["path"], *_peers(swarm))
    assert proc.stdout.splitlines()[0] == "model " + prefix + ": 8 blocks, 2 servers online", proc.stdout
    local.kill(doomed)
    proc = _run("status", swarm["path"], *_peers(swarm), "--json")
    report = json.loads(proc.stdout)
    by_peer = {s["peer_id"]: s for s in report["servers"]}
    assert by_peer[doomed.peer_id]["status"] == "dead" and by_peer[doomed.peer_id]["state"] == "online"
    assert report["serving"] == 1
    proc = _run("status", swarm["path"], *_peers(swarm))
    assert proc.stdout.splitlines()[0] == f"model {prefix}: 8 blocks, 1 server online (1 dead)", proc.stdout
    assert any("doomed" in line and " dead " in line for line in proc.stdout.splitlines())


def test_ctrl_c_on_a_client(swarm: dict[str, Any], tmp_path: Path) -> None:
    err = tmp_path / "client.err"
    with open(err, "w") as err_file:
        proc = subprocess.Popen(
            [*CLI, "generate", swarm["path"], *_peers(swarm), "--prompt", "Hi", "--model-prefix", "nobody-serves",
             "--wait-for-servers", "300"],
            stdout=subprocess.DEVNULL, stderr=err_file, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "joined the swarm" not in err.read_text():  # now waiting for servers that never come
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # to the client only: it must stop its own p2pd
        assert proc.wait(timeout=DEADLINE) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = err.read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "potluck: interrupted", text[-3000:]
    assert _group_gone(proc.pid), "the client left processes behind (its p2pd?)"


def test_ctrl_c_on_a_server(swarm: dict[str, Any]) -> None:
    local: LocalSwarm = swarm["swarm"]
    server = local.start_server(swarm["path"], (2, 4), name="interrupted")
    server.popen.send_signal(signal.SIGINT)  # to the server only: it must stop its own p2pd
    assert server.popen.wait(timeout=30) == 0
    log = server.log_path.read_text()
    assert "Traceback" not in log and "server stopped" in log, log[-3000:]
    assert _group_gone(server.popen.pid), "the server left processes behind (its p2pd?)"
