"""The server's KV-cache budget, counted in tokens (batch rows x max_length) per block of the span."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class CacheFullError(RuntimeError):
    """No room in the KV-cache budget within the allowed wait."""


class CacheBudget:
    """Sessions reserve ``batch * max_length`` tokens up front; a full budget makes them wait, then fail.

    ``release`` is synchronous, so closing a session (a move, a drain) returns its room at once.
    """

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.used = 0
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def left(self) -> int:
        return self.capacity - self.used

    async def acquire(self, tokens: int, timeout: float) -> None:
        if tokens > self.capacity:
            raise CacheFullError(
                f"a session of {tokens} tokens exceeds this server's whole cache budget of {self.capacity} tokens"
            )
        deadline = time.monotonic() + timeout
        while self.left < tokens:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheFullError(
                    f"no KV-cache room for {tokens} tokens within {timeout:.1f}s "
                    f"({self.left} of {self.capacity} free)"
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter
            finally:
                self._waiters.discard(waiter)
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, timeout: float) -> AsyncIterator[None]:
        await self.acquire(tokens, timeout)
        try:
            yield
        finally:
            self.release(tokens)
