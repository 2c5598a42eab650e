"""The server's KV-cache budget, counted in tokens (batch rows x max_length) per block of the span."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CacheFullError(RuntimeError):
    """No room in the KV-cache budget within the allowed wait."""


class CacheBudget:
    """Sessions reserve ``batch * max_length`` tokens up front; a full budget makes them wait, then fail."""

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.used = 0
        self._changed = asyncio.Condition()

    @property
    def left(self) -> int:
        return self.capacity - self.used

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, timeout: float) -> AsyncIterator[None]:
        if tokens > self.capacity:
            raise CacheFullError(
                f"a session of {tokens} tokens exceeds this server's whole cache budget of {self.capacity} tokens"
            )
        async with self._changed:
            try:
                if self.left < tokens:  # wait_for with timeout 0 would fail even when room is there
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.left >= tokens), timeout=timeout
                    )
            except TimeoutError:
                raise CacheFullError(
                    f"no KV-cache room for {tokens} tokens within {timeout:.1f}s ({self.left} of {self.capacity} free)"
                ) from None
            self.used += tokens
        try:
            yield
        finally:
            async with self._changed:
                self.used -= tokens
                self._changed.notify_all()
