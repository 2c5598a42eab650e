"""The server's table of open inference sessions: listed, limited, closed and accounted for in one place.

A session owns its KV cache and its share of the cache budget. The stream handler that serves it only holds the
:class:`Session`; closing the session (client hang-up, a rebalancing move, a drain) drops the cache and returns
the budget at once, instead of when the handler next wakes up.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from potluck.models import BlockSpan, KVCache
from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.tuning import TuningInputs

logger = logging.getLogger(__name__)

# While a session open waits for cache room, idle sessions of clients over their share are looked for this often
EVICTION_RECHECK = 1.0


class SessionClosedError(RuntimeError):
    """The server closed this session (``code`` tells the client why, e.g. ``wrong_span`` after a move)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Session:
    """One client's open inference session on a sub-span of this server."""

    id: str
    peer: str  # the client's peer id: fairness and per-peer budgets go by it
    span: BlockSpan  # the blocks this session runs (a slice of the server's span)
    batch_size: int
    max_length: int
    tuning: TuningInputs
    # sessions with equal ``group`` may share one batched forward: same blocks and the same server-side
    # adapter; sessions with their own prompts or LoRA tensors get a group of their own
    group: Hashable
    cache: KVCache | None = None  # None once closed: the memory is gone
    opened_at: float = field(default_factory=time.monotonic)
    steps: int = 0
    closed: SessionClosedError | None = None  # why the server closed it, if it did
    last_active: float = field(default_factory=time.monotonic)  # when a step of it last arrived or finished
    busy: int = 0  # steps of it queued or computing now (a busy session is never idle)
    # its latest step came from the client as the first hop of its chain (InferenceStep.chain_start): a decode
    # batch here waits for all such sessions (server/scheduler.py:gather_until)
    leads_chain: bool = False

    @property
    def tokens(self) -> int:
        """Cache tokens this session reserved from the budget."""
        return self.batch_size * self.max_length

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0


def group_key(start: int, end: int, tuning: TuningInputs, adapter: str | None, session_id: str) -> Hashable:
    """Sessions that can share a forward: same blocks and the same (possibly no) preloaded adapter ``adapter``."""
    if tuning.prompts is not None or tuning.sent_lora:
        return (start, end, "own", session_id)
    return (start, end, "adapter", adapter)


def choose_evictions(
    sessions: Sequence[Session],
    *,
    requester: str,
    needed: int,
    free: int,
    capacity: int,
    now: float,
    idle_after: float,
) -> list[Session]:
    """Sessions to close so that ``needed`` cache tokens fit for client peer ``requester``; pure, for tests.

    A client's fair share is the budget divided by the client peers holding sessions (the requester included).
    Only idle sessions (no step for ``idle_after`` seconds, none in flight) of *other* clients holding more than
    their share are closed, longest idle first, and only while their client stays over its share. A requester
    that would itself pass its share closes nobody's session. Returns [] when even all such sessions would not
    make room: closing some of them would not help anyone.
    """
    if needed <= free:
        return []
    held: Counter[str] = Counter()
    for s in sessions:
        held[s.peer] += s.tokens
    share = capacity // len(set(held) | {requester})
    if held[requester] + needed > share:
        return []
    idle = sorted(
        (s for s in sessions if s.peer != requester and s.busy == 0 and now - s.last_active >= idle_after),
        key=lambda s: s.last_active,
    )
    chosen = []
    for session in idle:
        if free >= needed:
            break
        if held[session.peer] > share:
            chosen.append(session)
            held[session.peer] -= session.tokens
            free += session.tokens
    return chosen if free >= needed else []


class SessionTable:
    """Open sessions by id, with the cache budget, per-client-peer bounds and fair-share eviction."""

    def __init__(
        self, budget: CacheBudget, peer_tokens: int, peer_sessions: int = 64, evict_idle_after: float = 15.0
    ):
        self.budget = budget
        self.peer_tokens = peer_tokens  # cache tokens one client peer's sessions may hold together
        self.peer_sessions = peer_sessions  # sessions one client peer may hold open together
        self.evict_idle_after = (
            evict_idle_after  # idle seconds after which a session over its share may close
        )
        self.evicted = 0  # sessions closed to make room for another client, for logs and tests
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def tokens_of(self, peer: str) -> int:
        return sum(s.tokens for s in self._sessions.values() if s.peer == peer)

    async def open(
        self,
        *,
        peer: str,
        span: BlockSpan,
        batch_size: int,
        max_length: int,
        tuning: TuningInputs,
        adapter: str | None,
        alloc_timeout: float,
        make_cache: Callable[[], Awaitable[KVCache]],
    ) -> Session:
        """Reserve the budget (waiting up to ``alloc_timeout``), allocate the cache and register the session."""
        session_id = uuid.uuid4().hex
        session = Session(
            id=session_id,
            peer=peer,
            span=span,
            batch_size=batch_size,
            max_length=max_length,
            tuning=tuning,
            group=group_key(span.start, span.end, tuning, adapter, session_id),
        )
        count = sum(1 for s in self._sessions.values() if s.peer == peer)
        if count >= self.peer_sessions:
            raise CacheFullError(
                f"client {peer[-8:]} already holds {count} sessions here, the per-client limit: close one first"
            )
        held = self.tokens_of(peer)
        # only a bound tighter than the whole budget refuses; otherwise the budget's own wait applies
        tighter = self.peer_tokens < self.budget.capacity
        if tighter and session.tokens <= self.budget.capacity and held + session.tokens > self.peer_tokens:
            raise CacheFullError(
                f"client {peer[-8:]} already holds {held} cache tokens here; {session.tokens} more would pass "
                f"the per-client bound of {self.peer_tokens}"
            )
        await self._acquire(peer, session.tokens, alloc_timeout)
        try:
            session.cache = await make_cache()
        except BaseException:
            self.budget.release(session.tokens)
            raise
        self._sessions[session_id] = session
        return session

    async def _acquire(self, peer: str, tokens: int, timeout: float) -> None:
        """Reserve ``tokens``: close idle sessions of clients over their fair share if that makes room, else
        wait for room (looking again now and then) up to ``timeout``, then a clear ``cache_full``."""
        if tokens > self.budget.capacity:
            await self.budget.acquire(tokens, timeout)  # raises: more than the whole budget
        deadline = time.monotonic() + timeout
        while True:
            self.evict_for(peer, tokens)
            remaining = deadline - time.monotonic()
            try:
                await self.budget.acquire(tokens, max(0.0, min(remaining, EVICTION_RECHECK)))
                return
            except CacheFullError:
                if remaining <= EVICTION_RECHECK:
                    raise CacheFullError(
                        f"no KV-cache room for {tokens} tokens within {timeout:.1f}s ({self.budget.left} of "
                        f"{self.budget.capacity} free, and no idle session of a client over its fair share "
                        "to close): try another server"
                    ) from None

    def evict_for(self, peer: str, tokens: int) -> int:
        """Close idle sessions of clients over their fair share so that ``tokens`` fit for ``peer``."""
        chosen = choose_evictions(
            self.list(),
            requester=peer,
            needed=tokens,
            free=self.budget.left,
            capacity=self.budget.capacity,
            now=time.monotonic(),
            idle_after=self.evict_idle_after,
        )
        for session in chosen:
            idle = time.monotonic() - session.last_active
            logger.info(
                "evicting session %s of client %s (idle %.0fs, its client over its fair share) for client %s",
                session.id[:8], session.peer[-8:], idle, peer[-8:],
            )  # fmt: skip
            self.close(
                session,
                SessionClosedError(
                    "evicted",
                    f"this session was idle for {idle:.0f}s while its client held more than its fair share of "
                    "the KV cache, and another client needed room: it was closed; open a new one",
                ),
            )
        self.evicted += len(chosen)
        return len(chosen)

    def close(self, session: Session, reason: SessionClosedError | None = None) -> bool:
        """Forget ``session``, drop its cache and return its budget now; False if it was already closed."""
        if self._sessions.pop(session.id, None) is None:
            return False
        session.cache = None
        session.closed = reason or SessionClosedError("closed", "the session is closed")
        self.budget.release(session.tokens)
        return True

    def close_all(self, code: str, message: str) -> int:
        """Close every session (a move or a drain); their handlers answer the next step with ``code``."""
        sessions = self.list()
        for session in sessions:
            self.close(session, SessionClosedError(code, message))
        return len(sessions)
