"""Start a swarm of real processes on this machine (demo, benchmarks, tests) and always stop it.

Each process runs in its own process group, so stopping or killing it also reaches its p2pd daemon, and the unix
sockets a killed process could not remove are removed for it: a killed server leaves nothing behind, as if its
machine vanished.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_PREFIX = "POTLUCK_READY "
ENV_LINK_DELAY_MS = "POTLUCK_LINK_DELAY_MS"  # read by swarm/link.py in every process we start
ENV_LINK_MBPS = "POTLUCK_LINK_MBPS"


class LaunchError(RuntimeError):
    """A swarm process failed to start."""


@dataclass
class SwarmProcess:
    """A running ``potluck bootstrap`` or ``potluck serve`` process."""

    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    ready: threading.Event = field(default_factory=threading.Event)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return str(self.info.get("peer_id", ""))

    @property
    def maddrs(self) -> list[str]:
        return [str(m) for m in self.info.get("maddrs", [])]  # type: ignore[attr-defined]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def remove_sockets(self) -> None:
        """Remove the unix sockets the process named in its readiness line (``sockets``) that are still there.
        A clean stop removes its own; a killed process (and its p2pd) leaves them in /tmp. Only sockets go."""
        for path in self.info.get("sockets", []):  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm:
    """A context manager owning every process it starts; ``close`` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})  # added to every process's environment (e.g. POTLUCK_LINK_DELAY_MS)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.python = python
        self.processes: list[SwarmProcess] = []
        self.initial_peers: list[str] = []

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> SwarmProcess:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "w")  # noqa: SIM115 - owned by the child for its lifetime
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        popen = subprocess.Popen(
            [self.python, "-m", "potluck.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            start_new_session=True,  # own process group: signals reach p2pd too
        )
        log.close()
        proc = SwarmProcess(name=name, popen=popen, log_path=log_path)
        threading.Thread(target=_read_stdout, args=(proc,), daemon=True).start()
        self.processes.append(proc)
        return proc

    def start_bootstrap(self, timeout: float = 60.0, extra_args: Sequence[str] = ()) -> list[str]:
        proc = self._spawn("bootstrap", ["bootstrap", "--host", self.host, *extra_args])
        self.wait_ready([proc], timeout)
        self.initial_peers = proc.maddrs
        return self.initial_peers

    def start_server(
        self,
        model: str,
        blocks: tuple[int, int] | None = None,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> SwarmProcess:
        if not self.initial_peers:
            raise LaunchError("start the bootstrap peer first")
        args = ["serve", model, "--host", self.host, "--initial-peers", *self.initial_peers]
        if blocks is not None:
            args += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
        args += list(extra_args)
        name = name or f"server{len(self.processes)}"
        proc = self._spawn(name, args, env)
        if wait:
            self.wait_ready([proc], timeout)
        return proc

    def start_first_server(
        self, model: str, *, name: str | None = None, extra_args: Sequence[str] = (), timeout: float = 120.0
    ) -> SwarmProcess:
        """``potluck serve MODEL --new-swarm``: the swarm's first peer, no bootstrap; later peers join through it."""
        args = ["serve", model, "--host", self.host, "--new-swarm", *extra_args]
        proc = self._spawn(name or f"server{len(self.processes)}", args)
        self.wait_ready([proc], timeout)
        if not self.initial_peers:
            self.initial_peers = proc.maddrs
        return proc

    def start_process(
        self, name: str, args: Sequence[str], *, wait: bool = True, timeout: float = 120.0
    ) -> SwarmProcess:
        """Another ``potluck`` command that prints a readiness line (``potluck api``, ``potluck dashboard``)."""
        proc = self._spawn(name, list(args))
        if wait:
            self.wait_ready([proc], timeout)
        return proc

    def wait_ready(self, procs: Sequence[SwarmProcess], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            while not proc.ready.wait(timeout=0.2):
                if not proc.alive():
                    raise LaunchError(
                        f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise LaunchError(f"{proc.name} was not ready within {timeout:.0f}s:\n{proc.log_tail()}")

    def kill(self, proc: SwarmProcess) -> None:
        """SIGKILL the process and its p2pd: the machine vanished."""
        proc.signal_group(signal.SIGKILL)
        proc.popen.wait(timeout=10)
        proc.remove_sockets()

    def freeze(self, proc: SwarmProcess) -> None:
        proc.signal_group(signal.SIGSTOP)

    def thaw(self, proc: SwarmProcess) -> None:
        proc.signal_group(signal.SIGCONT)

    def stop(self, proc: SwarmProcess, timeout: float = 20.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL the group if it lingers."""
        if proc.alive():
            proc.signal_group(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            proc.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=timeout)
        proc.signal_group(signal.SIGKILL)  # whatever is left in the group (p2pd) goes too
        if proc.alive():
            proc.popen.wait(timeout=10)
        proc.remove_sockets()
        return int(proc.popen.returncode or 0)

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.alive():
                proc.signal_group(signal.SIGCONT)
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            proc.signal_group(signal.SIGKILL)
            if proc.alive():
                proc.popen.wait(timeout=10)
            proc.remove_sockets()


def _read_stdout(proc: SwarmProcess) -> None:
    assert proc.popen.stdout is not None
    for line in proc.popen.stdout:
        if line.startswith(READY_PREFIX):
            try:
                proc.info = json.loads(line[len(READY_PREFIX) :])
            except json.JSONDecodeError:
                continue
            proc.ready.set()
        else:
            with open(proc.log_path, "a") as log:
                log.write(line)


@contextlib.contextmanager
def link_swarm(
    link_delay_ms: float = 0.0, link_mbps: float = 0.0, prefix: str = "potluck-bench-"
) -> Iterator[LocalSwarm]:
    """A ``LocalSwarm`` logging to a temporary directory whose processes all emulate the given link (swarm/link.py):
    the one setup of the benchmarks (the client passes the same values as ``link_delay_ms`` / ``link_mbps``)."""
    env = {ENV_LINK_DELAY_MS: str(link_delay_ms), ENV_LINK_MBPS: str(link_mbps)}
    with tempfile.TemporaryDirectory(prefix=prefix) as logs, LocalSwarm(logs, env=env) as swarm:
        yield swarm
