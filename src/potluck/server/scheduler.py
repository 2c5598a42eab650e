"""Continuous batching on the compute thread: ready steps of different sessions run as one forward.

Handlers submit a session's step and await its output. Whenever the compute thread is free, the scheduler
forms the next batch from everything pending at that moment (sessions join and leave at any step):

* one *group* per batch (same blocks, same preloaded adapter; sessions with their own prompts or LoRA tensors
  run alone), chosen by the client peer whose turn it is;
* decode steps first, then prefill work, each pass taking one request per client peer in round-robin order,
  so a client with many sessions cannot starve the others;
* at most ``token_budget`` rows x tokens per batch: a long prefill is cut into chunks that ride along with other
  sessions' decode steps (vLLM's chunked prefill), so it never stalls them for long;
* a decode-only batch may wait up to ``batch_wait`` seconds: the first server of its sessions' chains until all
  of them are queued, a later server while a burst of them is arriving from the previous one
  (:func:`gather_until`); a lone session never waits.

:func:`plan_batch` is the pure part (tested alone); :class:`StepScheduler` runs the batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from potluck.server import metrics
from potluck.server.runtime import PRIORITY_INFERENCE, threads_for
from potluck.server.sessions import Session, SessionClosedError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StepRequest:
    """One inference step of one session, possibly served over several batches (chunked prefill)."""

    session: Session
    hidden: torch.Tensor  # [B, T, H] all new tokens of the step
    position: int  # where the step starts (below the cache length: roll back first)
    hypo_ids: torch.Tensor | None  # beam search: reorder the cache rows first
    pads: list[int] | None  # left padding per row, declared with the step
    future: asyncio.Future[torch.Tensor]
    done: int = 0  # tokens already computed
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def remaining(self) -> int:
        return int(self.hidden.shape[1]) - self.done

    @property
    def group(self) -> Hashable:
        return self.session.group


@dataclass(frozen=True)
class Slot:
    """A request's part in a batch: tokens ``done..done+tokens-1`` of its step."""

    request: StepRequest
    tokens: int


def plan_batch(
    pending: dict[str, collections.deque[StepRequest]], peers: list[str], budget: int
) -> list[Slot]:
    """Choose the next batch. ``peers`` is the round-robin order (whose turn first); pure, for tests.

    Decode-sized requests (one token per row) go first, then prefills take what is left of ``budget``, cut
    into chunks; every pass takes at most one request per peer per round.
    """
    order = [p for p in peers if pending.get(p)]
    if not order:
        return []
    group = pending[order[0]][0].group
    queues = {p: [r for r in pending[p] if r.group == group] for p in order}
    slots: list[Slot] = []
    left = budget
    for decode in (True, False):
        taken = {p: 0 for p in order}
        progress = True
        while progress and left > 0:
            progress = False
            for peer in order:
                candidates = [r for r in queues[peer] if (r.remaining == 1) == decode]
                if taken[peer] >= len(candidates) or left <= 0:
                    continue
                request = candidates[taken[peer]]
                taken[peer] += 1
                progress = True
                tokens = min(request.remaining, left // request.rows)
                if tokens <= 0:
                    # no room for even one token per row this time: it waits for the next batch, unless the
                    # batch is empty (a request wider than the budget still runs, one token per row)
                    if slots:
                        continue
                    tokens = 1
                slots.append(Slot(request, tokens))
                left -= tokens * request.rows
    return slots


RECENT_S = 1.0  # a session that sent a step this recently is decoding, and its next step is expected soon
# steps from a previous stage this close after each other are one burst (one batch's outputs)
BURST_GAP_S = 0.006
# a session led here whose last step is older than this many of its periods is not waited for
MISSED_TURNS = 2.0


def gather_until(
    pending: dict[str, collections.deque[StepRequest]],
    recent: dict[Session, float],
    periods: dict[Session, float],
    now: float,
    deadline: float,
    last_arrival: float,
) -> float | None:
    """Until when a decode batch should wait for more steps before it runs (None: run now); pure, for tests.

    ``recent``: when each decoding session's latest step arrived (those of the last ``RECENT_S``); ``periods``:
    the time between its steps of late (unknown for a session with one step so far: taken as ``RECENT_S``);
    ``last_arrival``: when the latest step of any session arrived. Never past ``deadline``. Only a batch of decode
    steps waits (a prefill or a speculative check runs at once):

    * for the sessions this server *leads* (their client sends each step here first, ``Session.leads_chain``),
      until all of them are queued or ``deadline`` comes. A decode batch costs about the same for 1 or 8 sessions
      (the weights stream once), so the first stage gathers its sessions into one batch, which then travels the
      chain whole. Left to themselves, a pipeline's sessions settle into groups, one per stage, and every server
      runs several small batches per token: on ``potluck bench serve`` ~3.9 of 8 sessions per batch, against
      7.2-7.3 with this rule. A session whose last step is older than ``MISSED_TURNS`` of its periods has stopped
      (a chat waiting for its user) and is not waited for;
    * for the sessions that reach us from a previous stage, while one of them is queued and others are not, until
      ``BURST_GAP_S`` after the latest arrival: their steps come in a burst (one batch's outputs, pushed one by
      one), and running the first arrival alone splits it (measured: 2.2 sessions per batch without waiting). A
      later stage waits only for the rest of the burst, never for sessions elsewhere, and a server that leads some
      sessions and relays others does not wait for its leaders while a relayed step is queued: were two servers
      each to hold steps while waiting for the sessions the other holds, both would wait until the deadline, at
      every step.

    A lone session never waits.
    """
    queued = [r for queue in pending.values() for r in queue]
    if not queued or any(r.remaining > 1 for r in queued):
        return None
    group = queued[0].group
    have = {r.session for r in queued if r.group == group}
    decoding = {s for s in recent if s.group == group} | have
    leading = {s for s in decoding if s.leads_chain}
    relayed_queued = have - leading
    until: float | None = None
    if not relayed_queued:
        if any(now - recent[s] <= MISSED_TURNS * periods.get(s, RECENT_S) for s in leading - have):
            until = deadline
    elif (decoding - leading) - have:
        until = min(deadline, last_arrival + BURST_GAP_S)
    return until if until is not None and until > now else None


class StepScheduler:
    """Pending steps by client peer; one batch at a time on the compute thread."""

    def __init__(
        self,
        compute: Callable[[int, Callable[[], Any]], Awaitable[Any]],
        *,
        token_budget: int,
        device: torch.device,
        dtype: torch.dtype,
        batch_wait: float = 0.0,
    ):
        self._compute = compute  # runs a closure on the compute thread (with in-flight accounting)
        self.token_budget = token_budget
        self.device, self.dtype = device, dtype
        self._pending: dict[str, collections.deque[StepRequest]] = {}
        self._peers: collections.deque[str] = collections.deque()  # round-robin order
        self._task: asyncio.Task[None] | None = None
        self.batch_wait = batch_wait
        self._recent: dict[Session, float] = {}  # session -> when its last step arrived
        self._periods: dict[Session, float] = {}  # session -> time between its steps of late (a running mean)
        self._arrived = asyncio.Event()  # set on every new step (wakes _gather)
        # monotonic time of the latest step (a burst ends after BURST_GAP_S of quiet)
        self._last_arrival = 0.0
        self.batches = 0  # batches run, and rows in them: for logs and tests
        self.batched_rows = 0
        self.max_batch_sessions = 0

    async def step(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        hypo_ids: torch.Tensor | None = None,
        pads: list[int] | None = None,
    ) -> torch.Tensor:
        """Queue one step of ``session``; returns its output ``[B, T, H]`` (on CPU, in ``hidden``'s dtype)."""
        now = time.monotonic()
        session.last_active = now
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        request = StepRequest(session, hidden, position, hypo_ids, pads, future)
        if session.peer not in self._pending:
            self._pending[session.peer] = collections.deque()
            self._peers.append(session.peer)
        self._pending[session.peer].append(request)
        if self.batch_wait > 0:  # pruned in _gather, which then runs before every batch
            last = self._recent.get(session)
            if last is not None:
                interval = now - last
                previous = self._periods.get(session)
                self._periods[session] = interval if previous is None else 0.5 * (previous + interval)
            self._recent[session] = now
        self._last_arrival = now
        self._arrived.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        session.busy += 1  # a session with a step in flight is never idle (fair-share eviction)
        try:
            return await future
        finally:
            session.busy -= 1
            session.last_active = time.monotonic()

    def pending(self) -> int:
        return sum(len(q) for q in self._pending.values())

    async def _run(self) -> None:
        try:
            while True:
                self._drop_dead()
                if self.batch_wait > 0:
                    await self._gather()
                    self._drop_dead()
                slots = plan_batch(self._pending, list(self._peers), self.token_budget)
                if not slots:
                    return
                self._peers.rotate(-1)  # the next batch starts with the next client peer
                try:
                    outs = await self._compute(PRIORITY_INFERENCE, functools.partial(self._run_batch, slots))
                except Exception as e:  # delivered to every session of the batch
                    for slot in slots:
                        self._finish(slot.request, error=e)
                    continue
                for slot, out in zip(slots, outs, strict=True):
                    request = slot.request
                    request.outputs.append(out)
                    request.done += slot.tokens
                    if request.remaining == 0:
                        self._finish(request)
        finally:
            self._task = None

    async def _gather(self) -> None:
        """Before a decode-only batch: wait (at most ``batch_wait``) while :func:`gather_until` says so."""
        deadline = time.monotonic() + self.batch_wait
        while True:
            now = time.monotonic()
            for session in [s for s, t in self._recent.items() if now - t > RECENT_S or s.cache is None]:
                del self._recent[session]
                self._periods.pop(session, None)
            until = gather_until(
                self._pending, self._recent, self._periods, now, deadline, self._last_arrival
            )
            if until is None:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):  # then looked at again: the wait may be over
                async with asyncio.timeout(until - now):
                    await self._arrived.wait()

    def _drop_dead(self) -> None:
        """Fail requests of closed sessions and forget cancelled ones (their client went away)."""
        for peer in list(self._pending):
            queue = self._pending[peer]
            for request in list(queue):
                if request.future.done():
                    queue.remove(request)
                elif request.session.cache is None:
                    closed = request.session.closed or SessionClosedError("closed", "the session is closed")
                    self._finish(request, error=closed)
            if not queue:
                del self._pending[peer]
                self._peers.remove(peer)

    def _finish(self, request: StepRequest, error: BaseException | None = None) -> None:
        queue = self._pending.get(request.session.peer)
        if queue is not None and request in queue:
            queue.remove(request)
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            out = request.outputs[0] if len(request.outputs) == 1 else torch.cat(request.outputs, dim=1)
            request.future.set_result(out)

    def _run_batch(self, slots: list[Slot]) -> list[torch.Tensor]:
        """On the compute thread: prepare each cache (rollback, reorder, padding), then one forward."""
        torch.set_num_threads(threads_for(sum(s.tokens * s.request.rows for s in slots), len(slots)))
        started, started_cpu = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            items = []
            for slot in slots:
                request, cache = slot.request, slot.request.session.cache
                if cache is None:
                    raise SessionClosedError("closed", "the session was closed while its step waited")
                if request.done == 0:  # the step's first chunk
                    if request.position < cache.length:
                        cache.rollback(request.position)
                    if request.hypo_ids is not None:
                        cache.reorder(request.hypo_ids.to(cache.device))
                    if request.pads is not None:
                        cache.set_pads(request.pads)
                chunk = request.hidden[:, request.done : request.done + slot.tokens]  # [B, t, H]
                items.append((chunk.to(device=self.device, dtype=self.dtype), cache))
            first = slots[0].request.session
            if len(slots) == 1:  # alone: the plain span forward (deep prompts, sent LoRA, no packing cost)
                outs = [
                    first.span(
                        items[0][0], cache=items[0][1], prompts=first.tuning.prompts, lora=first.tuning.lora
                    )
                ]
            else:
                outs = first.span.forward_packed(items, lora=first.tuning.lora)
            self.batches += 1
            self.batched_rows += sum(s.request.rows for s in slots)
            self.max_batch_sessions = max(self.max_batch_sessions, len(slots))
            metrics.count_batch(len(slots), time.perf_counter() - started, time.thread_time() - started_cpu)
            return [
                out.to(device="cpu", dtype=slot.request.hidden.dtype)
                for out, slot in zip(outs, slots, strict=True)
            ]
