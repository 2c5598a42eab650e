"""The server's table of open inference sessions: listed, limited, closed and accounted for in one place.

A session owns its KV cache and its share of the cache budget. The stream handler that serves it only holds the
:class:`Session`; closing the session (client hang-up, a rebalancing move, a drain) drops the cache and returns
the budget at once, instead of when the handler next wakes up.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from potluck.models import BlockSpan, KVCache
from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.tuning import TuningInputs


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


class SessionTable:
    """Open sessions by id, with the cache budget and a per-client-peer bound."""

    def __init__(self, budget: CacheBudget, peer_tokens: int, peer_sessions: int = 64):
        self.budget = budget
        self.peer_tokens = peer_tokens  # cache tokens one client peer's sessions may hold together
        self.peer_sessions = peer_sessions  # sessions one client peer may hold open together
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
        await self.budget.acquire(session.tokens, alloc_timeout)
        try:
            session.cache = await make_cache()
        except BaseException:
            self.budget.release(session.tokens)
            raise
        self._sessions[session_id] = session
        return session

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
