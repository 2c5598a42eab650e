"""Fair-share eviction: which idle sessions make room for another client, and the session table applying it."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import pytest
import torch

from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.scheduler import StepScheduler
from potluck.server.sessions import Session, SessionTable, choose_evictions
from potluck.server.tuning import TuningInputs

_ids = itertools.count()


def _session(peer: str, tokens: int, idle: float, now: float = 1000.0, busy: int = 0) -> Session:
    return Session(
        id=f"s{next(_ids)}", peer=peer, span=None, batch_size=1, max_length=tokens,  # type: ignore[arg-type]
        tuning=TuningInputs(), group=None, last_active=now - idle, busy=busy,
    )  # fmt: skip


def _choose(sessions: list[Session], requester: str, needed: int, capacity: int = 100) -> list[Session]:
    free = capacity - sum(s.tokens for s in sessions)
    return choose_evictions(
        sessions,
        requester=requester,
        needed=needed,
        free=free,
        capacity=capacity,
        now=1000.0,
        idle_after=10.0,
    )


def test_idle_sessions_of_a_client_over_its_share_go_first_longest_idle_first() -> None:
    hog = [_session("hog", 30, idle=20), _session("hog", 30, idle=50), _session("hog", 20, idle=5)]
    fair = [_session("fair", 20, idle=500)]  # idle for ages, but within its share (100 // 3 = 33)
    assert _choose(hog + fair, "new", needed=25) == [hog[1]]  # the longest idle of the hog, and only it
    assert _choose(hog + fair, "new", needed=30) == [hog[1]]
    # the hog at 80 > 33: two of its idle sessions may go; the busy one (idle 5 s) never does
    assert _choose(hog + fair, "new", needed=33) == [hog[1], hog[0]]


def test_nothing_is_evicted_when_it_would_not_help_or_would_not_be_fair() -> None:
    hog = [_session("hog", 40, idle=60), _session("hog", 40, idle=60, busy=1)]
    other = [_session("other", 20, idle=60)]
    assert _choose(hog + other, "new", needed=10) == [hog[0]]
    assert _choose(hog + other, "new", needed=50) == []  # closing every candidate frees only 40: close none
    assert _choose(hog + other, "new", needed=34) == []  # the requester would pass its own share (100 // 3)
    assert _choose(hog + other, "hog", needed=20) == []  # nobody else is over the share: the hog waits
    assert _choose([_session("hog", 90, idle=5)], "new", needed=20) == []  # not idle long enough
    assert _choose(hog, "new", needed=5, capacity=100) == []  # there is room already: 20 free


def test_the_table_evicts_for_another_client_and_the_evicted_step_is_told_why() -> None:
    async def main() -> None:
        table = SessionTable(CacheBudget(100), peer_tokens=100, peer_sessions=8, evict_idle_after=0.0)

        async def open_(peer: str, tokens: int, timeout: float = 0.2) -> Session:
            async def make_cache() -> object:
                return object()  # the table only needs *a* cache

            return await table.open(
                peer=peer, span=SimpleNamespace(start=0, end=1), batch_size=1, max_length=tokens, tuning=TuningInputs(),  # type: ignore[arg-type]
                adapter=None, alloc_timeout=timeout, make_cache=make_cache,  # type: ignore[arg-type]
            )  # fmt: skip

        first, second = await open_("hog", 50), await open_("hog", 50)
        first.last_active -= 10  # longest idle
        new = await open_("new", 40)
        assert first.cache is None and first.closed is not None and first.closed.code == "evicted"
        assert second.cache is not None and table.evicted == 1 and table.budget.used == 90
        # the evicted session's next step fails with that code (the handler answers it as an ErrorReply)
        scheduler = StepScheduler(lambda p, fn: asyncio.sleep(0), token_budget=8, device=None, dtype=None)  # type: ignore[arg-type]
        with pytest.raises(Exception) as failed:
            await scheduler.step(first, torch.zeros(1, 1, 4), 0)
        assert getattr(failed.value, "code", None) == "evicted"
        # a further client asking more than its own share (100 // 3) closes nobody's session: a clear cache_full
        with pytest.raises(CacheFullError, match="no idle session of a client over its fair share"):
            await open_("late", 40)
        assert second.cache is not None and new.cache is not None
        await open_("late", 30)  # within its share: the hog, still over its share, loses its idle session
        assert second.closed is not None and second.closed.code == "evicted" and new.cache is not None

    asyncio.run(main())
