"""The emulated WAN link: delayed, ordered, pipelined delivery, a bandwidth cap, and a flush on close."""

from __future__ import annotations

import asyncio

import pytest

from potluck.swarm import link
from potluck.swarm.link import LinkEmulation, ShapedWriter


class RecordingWriter:
    """Stands in for a socket writer: notes when each write reached it."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.received.append((asyncio.get_running_loop().time(), bytes(data)))

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def test_delay_is_applied_in_order_and_pipelined() -> None:
    async def run() -> tuple[float, list[tuple[float, bytes]]]:
        inner = RecordingWriter()
        writer = ShapedWriter(inner, LinkEmulation(delay_ms=300))
        t0 = asyncio.get_running_loop().time()
        for i in range(5):
            writer.write(bytes([i]) * 10)
            await writer.drain()  # returns at once: a link does not block the sender
        assert inner.received == []  # nothing arrives before the delay
        writer.close()
        await writer.wait_closed()
        return t0, inner.received

    t0, received = asyncio.run(run())
    assert [data[0] for _, data in received] == [0, 1, 2, 3, 4]
    assert all(at - t0 >= 0.3 for at, _ in received)
    # Pipelined: five messages sent back to back all arrive about one delay after sending, not five delays.
    assert received[-1][0] - t0 < 0.6


def test_bandwidth_cap_serialises_large_messages() -> None:
    async def run() -> tuple[float, list[tuple[float, bytes]]]:
        inner = RecordingWriter()
        writer = ShapedWriter(inner, LinkEmulation(delay_ms=10, mbps=1.0))  # 12,500 bytes take 0.1 s
        t0 = asyncio.get_running_loop().time()
        writer.write(b"a" * 12_500)
        writer.write(b"b" * 12_500)
        writer.close()
        await writer.wait_closed()
        return t0, inner.received

    t0, received = asyncio.run(run())
    assert received[0][0] - t0 >= 0.1 + 0.01
    assert received[1][0] - t0 >= 0.2 + 0.01
    assert received[0][1] == b"a" * 12_500


def test_close_delivers_everything_then_closes_the_inner_writer() -> None:
    async def run() -> RecordingWriter:
        inner = RecordingWriter()
        writer = ShapedWriter(inner, LinkEmulation(delay_ms=50))
        writer.write(b"last reply")
        writer.close()
        with pytest.raises(ConnectionResetError):
            writer.write(b"after close")
        await writer.wait_closed()
        return inner

    inner = asyncio.run(run())
    assert [d for _, d in inner.received] == [b"last reply"] and inner.closed


def test_process_setting_from_environment_and_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link, "_current", None)
    monkeypatch.setenv(link.ENV_DELAY_MS, "25")
    assert link.current() == LinkEmulation(delay_ms=25.0)
    assert link.configure(mbps=100) == LinkEmulation(delay_ms=25.0, mbps=100.0)
    monkeypatch.setattr(link, "_current", LinkEmulation())
    writer = object()
    assert link.shape(writer) is writer  # no emulation: the writer itself, no overhead
    with pytest.raises(ValueError):
        LinkEmulation(delay_ms=-1)
