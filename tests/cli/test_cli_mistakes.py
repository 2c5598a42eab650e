"""Every common mistake, run as a real `potluck` process: one line on stderr that says what was wrong and what to
do, exit code 2 (usage) or 1 (runtime), no traceback, and all within 10 seconds. None of these needs a swarm."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DEADLINE = 10.0  # seconds from start to exit, Python start-up and imports included
PEER_ID = "12D3KooWQ5Zz5r1mQ1FhJzW3r9JvS9X3b8Y7Uu3k6Nq3T4ZGd9nE"


def closed_port() -> int:
    """A local port nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def down_peer() -> str:
    """A well-formed multiaddr of a bootstrap peer that is not running."""
    return f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Callable[[str], str]) -> str:
    return tiny_model_dir("llama-tied")  # 8 blocks


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "potluck.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,  # raises (and fails the test) if the mistake is not reported in time
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    proc.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return proc


def assert_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> list[str]:
    """Exit ``code``, no traceback, and the last stderr line is the error naming every fragment."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("potluck") and ": error: " in lines[-1], proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    if code == 2:  # usage errors: that one line (and warnings) is all
        assert all(": warning: " in line for line in lines[:-1]), proc.stderr
    return lines


# --- usage errors (exit 2) ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "generate", "status", "finetune"])
def test_model_path_that_does_not_exist(command: str, tmp_path: Path, down_peer: str) -> None:
    missing = str(tmp_path / "no-such-model")
    extra = {"serve": ["--blocks", "0:1"], "generate": ["--prompt", "hi"]}.get(command, [])
    proc = run_cli(command, missing, "--initial-peers", down_peer, *extra)
    assert_error(proc, 2, f"model path {missing} does not exist")


def test_relative_model_path_that_does_not_exist(down_peer: str) -> None:
    proc = run_cli("serve", "./models/llama", "--blocks", "0:1", "--initial-peers", down_peer)
    assert_error(proc, 2, "model path ./models/llama does not exist", "pass an existing checkpoint directory")


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("4:2", "'4:2' is reversed"),
        ("3:3", "'3:3' is empty"),
        ("", "expected START:END"),
        ("2", "expected START:END"),
    ],
)
def test_bad_blocks(blocks: str, message: str, model: str, down_peer: str) -> None:
    proc = run_cli("serve", model, "--blocks", blocks, "--initial-peers", down_peer)
    assert_error(proc, 2, "argument --blocks", message)


def test_blocks_beyond_the_model(model: str, down_peer: str) -> None:
    proc = run_cli("serve", model, "--blocks", "0:9", "--initial-peers", down_peer)
    assert_error(proc, 2, "--blocks 0:9 is outside the model's 8 blocks", "within 0:8")


def test_blocks_with_num_blocks(model: str, down_peer: str) -> None:
    proc = run_cli("serve", model, "--blocks", "0:2", "--num-blocks", "2", "--initial-peers", down_peer)
    assert_error(proc, 2, "pass --blocks A:B", "or --num-blocks N", "not both")


def test_serve_without_peers_or_new_swarm(model: str) -> None:
    assert_error(run_cli("serve", model, "--blocks", "0:1"), 2, "pass --initial-peers MADDR", "--new-swarm")


@pytest.mark.parametrize(
    ("argv", "option", "problem"),
    [
        (["serve", "MODEL", "--blocks", "0:1", "--initial-peers", "garbage"], "--initial-peers", "Must begin with /"),
        (["generate", "MODEL", "--prompt", "hi", "--initial-peers", "/ip4/1.2.3.4/tcp/5"], "--initial-peers",
         "no /p2p/PEER_ID part"),
        (["status", "MODEL", "--initial-peers", "/ip4/1.2.3/tcp/5/p2p/x"], "--initial-peers", "not IPv4"),
        (["status", "--initial-peers", "/ip4/127.0.0.1/udpp/5"], "--initial-peers", "udpp"),
        (["finetune", "MODEL", "--initial-peers", "127.0.0.1:31337"], "--initial-peers", "Must begin with /"),
        (["serve", "MODEL", "--new-swarm", "--announce-maddrs", "1.2.3.4:5"], "--announce-maddrs", "Must begin with"),
    ],
)  # fmt: skip
def test_bad_multiaddr(argv: list[str], option: str, problem: str, model: str) -> None:
    proc = run_cli(*[model if a == "MODEL" else a for a in argv])
    assert_error(proc, 2, f"{option}: ", "is not a valid multiaddr", problem, "expected /ip4/")


def test_empty_prompt(model: str, down_peer: str) -> None:
    for prompt in ("", "   "):
        proc = run_cli("generate", model, "--initial-peers", down_peer, "--prompt", prompt)
        assert_error(proc, 2, "--prompt is empty", "pass the text to continue")


def test_env_var_mistake_is_a_usage_error(model: str, down_peer: str) -> None:
    proc = run_cli("serve", model, "--initial-peers", down_peer, env={"POTLUCK_BLOCKS": "5:1"})
    assert_error(proc, 2, "argument --blocks", "'5:1' is reversed")


# --- runtime errors (exit 1) ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "status", "generate"])
def test_bootstrap_that_is_down(command: str, model: str, down_peer: str) -> None:
    extra = {"serve": ["--blocks", "0:1"], "generate": ["--prompt", "hi"]}.get(command, [])
    proc = run_cli(command, model, "--initial-peers", down_peer, *extra)
    assert_error(
        proc, 1, f"could not reach any initial peer ({down_peer} (Connection refused))", "bootstrap peer"
    )


def test_debug_log_level_adds_the_traceback(model: str, down_peer: str) -> None:
    proc = run_cli("status", model, "--initial-peers", down_peer, "--log-level", "DEBUG")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("potluck status: error: could not reach any initial peer")
    )


def test_port_in_use(model: str, busy_port: int) -> None:
    proc = run_cli("serve", model, "--new-swarm", "--host", "127.0.0.1", "--port", str(busy_port))
    assert_error(proc, 1, f"port {busy_port} on 127.0.0.1 is already in use", "pass another --port")
    proc = run_cli("bootstrap", "--host", "127.0.0.1", "--port", str(busy_port))
    assert_error(proc, 1, f"port {busy_port} on 127.0.0.1 is already in use")


def test_hub_name_without_network_fails_fast(tmp_path: Path, down_peer: str) -> None:
    # The hub at a closed local port: what "no network" looks like, deterministically; and an empty cache.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("serve", "some-org/some-model", "--blocks", "0:1", "--initial-peers", down_peer, env=env)
    assert_error(proc, 1, "cannot reach the Hugging Face hub to fetch some-org/some-model", "not cached")
    env["HF_HUB_OFFLINE"] = "1"
    proc = run_cli("generate", "some-org/some-model", "--prompt", "hi", "--initial-peers", down_peer, env=env)
    assert_error(
        proc, 1, "some-org/some-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    )


# --- warnings: the command goes on (here into a bootstrap that is down) ---------------------------------


def test_temperature_without_do_sample_warns(model: str, down_peer: str) -> None:
    proc = run_cli("generate", model, "--initial-peers", down_peer, "--prompt", "hi", "--temperature", "0.7")
    lines = assert_error(proc, 1, "could not reach any initial peer")
    assert "potluck: warning: --temperature has no effect without --do-sample" in lines[0]


def test_float16_on_cpu_warns(model: str, down_peer: str) -> None:
    proc = run_cli(
        "serve",
        model,
        "--blocks",
        "0:1",
        "--device",
        "cpu",
        "--dtype",
        "float16",
        "--initial-peers",
        down_peer,
    )
    lines = assert_error(proc, 1, "could not reach any initial peer")
    assert any("potluck: warning: --dtype float16 on CPU is slow" in line for line in lines)
