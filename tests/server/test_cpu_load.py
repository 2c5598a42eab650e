"""The machine's recent CPU use (server/cpu_load.py) and the thread count a small step takes from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.server import runtime
from potluck.server.cpu_load import CpuTicks, IdleCores, read_cpu_ticks, steal_share


def _stat(path: Path, user: int, idle: int, steal: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice, then per-CPU lines
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n", encoding="ascii")


def test_ticks_and_shares(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, user=100, idle=300, steal=0)
    first = read_cpu_ticks(str(stat))
    assert first == CpuTicks(idle=300, steal=0, total=400)
    _stat(stat, user=150, idle=320, steal=30)  # 100 ticks: 50 user, 20 idle, 30 stolen
    second = read_cpu_ticks(str(stat))
    assert second is not None
    assert second.share_since(first) == pytest.approx((0.2, 0.3))
    assert second.share_since(second) == (0.0, 0.0)  # no time passed: no division by zero
    assert steal_share(first, second) == pytest.approx(0.3)
    assert steal_share(None, second) is None and steal_share(first, None) is None


@pytest.mark.parametrize("content", ["", "intr 1 2 3\n", "cpu 1 2 x 4 5 6 7 8\n", "cpu 1 2\n"])
def test_unreadable_stat_means_unknown(tmp_path: Path, content: str) -> None:
    stat = tmp_path / "stat"
    stat.write_text(content, encoding="ascii")
    assert read_cpu_ticks(str(stat)) is None
    assert read_cpu_ticks(str(tmp_path / "missing")) is None
    assert IdleCores(str(stat), cores=4)() == 0.0  # nothing known: no core counts as idle


def test_idle_cores_over_the_last_window(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, user=0, idle=0, steal=0)
    idle = IdleCores(str(stat), cores=2, window=0.0)  # sample at every call
    assert idle() == 0.0  # the first sample has nothing to compare with
    _stat(stat, user=25, idle=75, steal=0)
    assert idle() == pytest.approx(1.5)  # 75% of 2 cores idle
    _stat(stat, user=125, idle=75, steal=0)
    assert idle() == pytest.approx(0.0)
    slow = IdleCores(str(stat), cores=2, window=3600.0)
    slow()
    _stat(stat, user=125, idle=1000, steal=0)
    assert slow() == 0.0  # within the window the last answer stands: the file is not read at every step


def test_small_steps_take_idle_cores_large_ones_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_DEFAULT_THREADS", 4)
    # (idle cores of late, threads for a batch of several sessions, threads for one session's step)
    for idle, batched, alone in [
        (0.0, 1, 1),
        (0.2, 1, 1),
        (0.3, 1, 2),  # one session's pipeline partners take turns with it: a quarter-idle core is its own
        (0.4, 1, 2),
        (0.6, 2, 2),
        (1.3, 2, 3),
        (1.5, 3, 3),
        (3.0, 4, 4),
        (7.0, 4, 4),
    ]:
        monkeypatch.setattr(runtime, "idle_cores", lambda idle=idle: idle)
        assert runtime.threads_for(1, sessions=3) == batched, idle
        assert runtime.threads_for(runtime.SMALL_STEP_TOKENS, sessions=2) == batched, idle
        assert runtime.threads_for(1) == alone, idle
        assert runtime.threads_for(runtime.SMALL_STEP_TOKENS, sessions=1) == alone, idle
        for sessions in (1, 2):  # prefill, training: all threads
            assert runtime.threads_for(runtime.SMALL_STEP_TOKENS + 1, sessions) == 4
    monkeypatch.setattr(runtime, "_DEFAULT_THREADS", 1)
    monkeypatch.setattr(runtime, "idle_cores", lambda: 3.0)
    assert runtime.threads_for(1) == 1
