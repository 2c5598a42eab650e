"""The compute thread: one thread owns the device and runs tasks in priority order.

Network handlers run in the event loop and never compute; they submit closures here and await the result.
Inference steps have a higher priority than forward/backward (training) so chat stays interactive while
fine-tuning runs on the same server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRIORITY_INFERENCE = 0  # interactive decoding steps go first
PRIORITY_FORWARD = 10  # training forward / prefill-sized work
PRIORITY_BACKWARD = 10

_STOP = object()

# Decode steps are memory-bound: one thread streams the weights as fast as all of them do here, and a single
# thread never waits at an OpenMP barrier for a sibling the OS descheduled (other processes share the cores).
SMALL_STEP_TOKENS = 8  # batch * tokens at or below which a step runs on one thread


def threads_for(tokens: int) -> int:
    return 1 if tokens <= SMALL_STEP_TOKENS else _DEFAULT_THREADS


_DEFAULT_THREADS = torch.get_num_threads()


class Runtime:
    """A single worker thread with a priority queue of closures."""

    def __init__(self, name: str = "potluck-runtime"):
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._counter = itertools.count()  # FIFO among equal priorities
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.busy_seconds = 0.0  # time spent computing, for load reports

    async def run(self, priority: int, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the compute thread; lower priority numbers run first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((priority, next(self._counter), (fn, loop, future)))
        return await future

    def _loop(self) -> None:
        import time

        while True:
            _prio, _seq, item = self._queue.get()
            if item is _STOP:
                return
            fn, loop, future = item
            if future.cancelled():
                continue  # the client went away while this task waited: skip the work
            t0 = time.perf_counter()
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting handler
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)
            self.busy_seconds += time.perf_counter() - t0

    def shutdown(self, timeout: float = 10.0) -> None:
        self._queue.put((1 << 30, next(self._counter), _STOP))
        self._thread.join(timeout)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
