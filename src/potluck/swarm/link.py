"""Emulated WAN links: every message this process sends arrives ``delay`` later, optionally at a capped rate.

The kernel's netem is not available everywhere (not in containers, not on the development machine), and a
client-side sleep per step is not how a network behaves: it blocks the sender and only covers one direction.
A ``ShapedWriter`` wraps the writer of any stream (libp2p or the direct path, client or server) and behaves
like a link: a write returns at once, its bytes are handed to the real writer ``delay`` seconds later, in order,
and later writes are not held up by earlier ones (pipelined). With a bandwidth cap, each write also occupies
the link for ``bytes * 8 / rate`` seconds, so large tensors queue behind each other as on a real uplink.

The emulation is per process and set once: ``POTLUCK_LINK_DELAY_MS`` / ``POTLUCK_LINK_MBPS`` in the
environment, or ``configure()`` from ``--link-delay-ms`` / ``--link-mbps``. It covers potluck's data streams;
the DHT's own traffic (records, routing tables) is hivemind's and is not delayed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from dataclasses import dataclass
from typing import Any

ENV_DELAY_MS = "POTLUCK_LINK_DELAY_MS"
ENV_MBPS = "POTLUCK_LINK_MBPS"

# Queued bytes above which ``drain()`` waits for the link: bounds memory when a sender outruns a slow link.
MAX_QUEUED_BYTES = 64 << 20


@dataclass(frozen=True)
class LinkEmulation:
    """One-way delay and bandwidth cap applied to everything this process sends."""

    delay_ms: float = 0.0  # added to every message, without blocking later ones
    mbps: float = 0.0  # link rate in megabits per second; 0: unlimited

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.mbps < 0:
            raise ValueError(f"link delay and rate must be >= 0, got {self.delay_ms} ms, {self.mbps} Mbit/s")

    @property
    def active(self) -> bool:
        return self.delay_ms > 0 or self.mbps > 0

    def transmit_seconds(self, nbytes: int) -> float:
        return nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0


def _from_env() -> LinkEmulation:
    try:
        return LinkEmulation(
            float(os.environ.get(ENV_DELAY_MS, 0) or 0), float(os.environ.get(ENV_MBPS, 0) or 0)
        )
    except ValueError as e:
        raise ValueError(f"bad {ENV_DELAY_MS}/{ENV_MBPS}: {e}") from None


_current: LinkEmulation | None = None


def configure(delay_ms: float | None = None, mbps: float | None = None) -> LinkEmulation:
    """Set this process's emulation; ``None`` takes what the environment says. Returns the result."""
    global _current
    base = _from_env()
    _current = LinkEmulation(
        base.delay_ms if delay_ms is None else delay_ms, base.mbps if mbps is None else mbps
    )
    return _current


def current() -> LinkEmulation:
    global _current
    if _current is None:
        _current = _from_env()
    return _current


def shape(writer: Any) -> Any:
    """``writer`` behind the process's emulated link, or ``writer`` itself when none is set."""
    link = current()
    return ShapedWriter(writer, link) if link.active else writer


class ShapedWriter:
    """A stream writer whose bytes reach the wrapped writer after the link's delay (FIFO, pipelined)."""

    def __init__(self, inner: Any, link: LinkEmulation):
        self._inner = inner
        self._link = link
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (release time, data)
        self._queued_bytes = 0
        self._link_free_at = 0.0  # when the emulated link finishes sending what is queued (bandwidth cap)
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._error: BaseException | None = None
        self._pump_task = self._loop.create_task(self._pump())

    # --- the StreamWriter surface the framing layer and handlers use ------------------------------------

    def write(self, data: Any) -> None:
        if self._closing:
            raise ConnectionResetError("write to a closed stream")
        payload = bytes(data)  # the caller may reuse its buffer (tensor memory) once write returns
        now = self._loop.time()
        start = max(now, self._link_free_at)
        self._link_free_at = start + self._link.transmit_seconds(len(payload))
        self._queue.append((self._link_free_at + self._link.delay_ms / 1000, payload))
        self._queued_bytes += len(payload)
        self._drained.clear()
        self._wakeup.set()

    async def drain(self) -> None:
        if self._error is not None:
            raise ConnectionResetError(f"emulated link: {self._error}") from self._error
        while self._queued_bytes > MAX_QUEUED_BYTES and self._error is None:
            self._drained.clear()
            await self._drained.wait()
        await self._inner.drain()

    def close(self) -> None:
        """Close after everything queued has been delivered (a last reply is never cut off by the delay)."""
        self._closing = True
        self._wakeup.set()

    def is_closing(self) -> bool:
        return self._closing or bool(self._inner.is_closing())

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self._pump_task
        with contextlib.suppress(Exception):
            await self._inner.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return False

    # --- delivery --------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._drained.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                release, payload = self._queue[0]
                wait = release - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._queue.popleft()
                self._queued_bytes -= len(payload)
                self._inner.write(payload)
                if not self._queue:
                    await self._inner.drain()
        except (ConnectionError, OSError) as e:
            self._error = e
        except asyncio.CancelledError:
            pass
        finally:
            self._queue.clear()
            self._queued_bytes = 0
            self._drained.set()
            with contextlib.suppress(Exception):
                self._inner.close()
