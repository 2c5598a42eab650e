"""The compute thread: one thread owns the device and runs tasks in priority order.

Network handlers run in the event loop and never compute; they submit closures here and await the result.
Inference steps have a higher priority than forward/backward (training) so chat stays interactive while
fine-tuning runs on the same server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from potluck.server.cpu_load import IdleCores

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRIORITY_INFERENCE = 0  # interactive decoding steps go first
PRIORITY_FORWARD = 10  # training forward / prefill-sized work
PRIORITY_BACKWARD = 10

_STOP = object()

# A decode step is small: more threads pay only when they get cores of their own. Measured on this project's 2-core
# test machines, a 1-row step of 4 blocks (1024 hidden): on an AMD EPYC 1 thread was about as fast as 2; on an
# Intel Xeon 26 ms on 1 thread, 16 ms on 2. But while other processes (another server, a client) compute on the same
# cores, a second thread waits at OpenMP barriers for a sibling the OS descheduled. So a small step takes one thread
# plus one per core that was idle over the last moment; a large one (prefill, training) always takes all of them.
#
# "Idle" depends on how many sessions the step carries. Several sessions' steps in flight keep a pipeline's stages
# computing at the same time, so the window's average is what this step will find: a core counts when it was at
# least half idle. One session's pipeline partners (its client, the other servers) take turns with us: they are
# idle whenever we compute, yet the window's average counts their turns as busy, so a core counts when it was at
# least a quarter idle. Measured on a quiet 2-core Intel Xeon with two loopback servers: with a half for lone steps
# too, they read 0.5-1.0 idle cores, took one thread in 31% of steps, and `potluck bench inference` put the swarm's
# step at 1.30-1.38x the in-process model's, against 1.18-1.21x with a quarter (2 alternated pairs) or with two
# threads always (3 pairs). With a quarter for batched steps as well, `potluck bench serve`'s server batches took
# 38.5-41.3 ms against 32.6-35.4 (3 pairs).
SMALL_STEP_TOKENS = 8  # batch * tokens at or below which a step looks for idle cores before more threads
IDLE_SHARE_BATCHED = 0.5  # a step of several sessions takes one more thread per core idle this share of late
IDLE_SHARE_ALONE = 0.25  # a step of one session: per core idle this share (its pipeline partners take turns)
idle_cores = IdleCores()


def threads_for(tokens: int, sessions: int = 1) -> int:
    """How many threads a forward over ``tokens`` rows*positions of ``sessions`` sessions should use (see the
    comment above)."""
    if tokens > SMALL_STEP_TOKENS or _DEFAULT_THREADS == 1:
        return _DEFAULT_THREADS
    share = IDLE_SHARE_ALONE if sessions <= 1 else IDLE_SHARE_BATCHED
    return max(1, min(_DEFAULT_THREADS, 1 + math.floor(idle_cores() + 1 - share)))


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
