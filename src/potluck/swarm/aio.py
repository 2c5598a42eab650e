"""Event loop choice: uvloop where available (it halves small-message latency), asyncio otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop is optional (e.g. Windows)
        return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Like ``asyncio.run`` on the fastest available loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
