"""Concurrent calls of a row-wise function, from several threads, run as one call over all their rows.

Why: a process that serves many users (``potluck api``, ``potluck bench serve``) runs one thread per session, and
each decode step ends in the LM head, a ``[rows, hidden] x [hidden, vocab]`` matmul that streams the whole
vocabulary matrix (131 MB for a 32k x 1024 fp32 head) for a single row. Threads that reach the head while another
thread's head call is running wait for it, then run together: one pass over the weights for all of them.

A call that finds the function idle leads: it runs with what is queued. While a call runs, later calls queue up;
when it ends, the oldest queued caller becomes the next leader and runs everyone queued (up to ``max_rows``). The
leader hands over after one call, so no thread computes for others forever. Steps of concurrent sessions come
back from the swarm in bursts, whose threads wake one by one; so a leader first waits up to ``settle`` seconds
(2 ms) for the other threads that called within the last second, until all of them are queued. A thread alone
(one session) never waits.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Call:
    rows: torch.Tensor  # [n, ...]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set (with done) when this caller must run the next batch itself
    result: torch.Tensor | None = None
    error: BaseException | None = None


class RowBatcher:
    """``batcher(rows [n, ...]) -> fn(rows)``, with concurrent callers' rows concatenated into one ``fn`` call.

    ``fn`` must be row-wise (row ``i`` of the output depends on row ``i`` of the input only) and must not need
    autograd: callers that need gradients call ``fn`` directly.
    """

    def __init__(
        self, fn: Callable[[torch.Tensor], torch.Tensor], max_rows: int = 64, settle: float = 0.002
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.fn = fn
        self.max_rows = max_rows
        self.settle = settle
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # notified on every new call
        self._callers: dict[int, float] = {}  # thread id -> when it last called
        self._queue: list[_Call] = []
        self._busy = False
        self.calls = 0  # fn calls made (for tests and metrics)
        self.rows = 0  # rows they covered

    def __deepcopy__(self, memo: dict[int, object]) -> RowBatcher:
        # a copied model gets its own queue and lock (locks cannot be copied), bound to the copy's function
        return RowBatcher(copy.deepcopy(self.fn, memo), self.max_rows, self.settle)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        call = _Call(rows)
        with self._lock:
            self._callers[threading.get_ident()] = time.monotonic()
            self._queue.append(call)
            self._queued.notify_all()
            lead = not self._busy
            self._busy = True
        if not lead:
            call.done.wait()
            if not call.lead:
                if call.error is not None:
                    raise call.error
                assert call.result is not None
                return call.result
        self._run_batch()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _settle(self) -> None:
        """(Lock held.) Wait up to ``settle`` for every thread that called in the last second to queue."""
        now = time.monotonic()
        deadline = now + self.settle
        for ident in [i for i, t in self._callers.items() if now - t > 1.0]:
            del self._callers[ident]
        while (
            len(self._queue) < min(len(self._callers), self.max_rows)
            and (left := deadline - time.monotonic()) > 0
        ):
            self._queued.wait(left)

    def _run_batch(self) -> None:
        """Run the oldest queued calls (this caller's first) as one, then hand the lead to the next in line."""
        with self._lock:
            self._settle()
            batch: list[_Call] = []
            taken = 0
            while self._queue and (not batch or taken + self._queue[0].rows.shape[0] <= self.max_rows):
                batch.append(self._queue.pop(0))
                taken += batch[-1].rows.shape[0]
        try:
            out = self.fn(torch.cat([c.rows for c in batch]) if len(batch) > 1 else batch[0].rows)  # [N, ...]
            lo = 0
            for c in batch:
                c.result, lo = out[lo : lo + c.rows.shape[0]], lo + c.rows.shape[0]
        except BaseException as e:  # noqa: BLE001 - every caller of this batch gets the error
            for c in batch:
                c.error = e
        with self._lock:
            self.calls += 1
            self.rows += taken
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        for c in batch:
            c.done.set()
        if nxt is not None:
            nxt.done.set()
