"""Server-side batching in-process: the batch planner, the session table and the scheduler on a real span."""

from __future__ import annotations

import asyncio
import collections
import gc
import random
import weakref
from typing import Any

import pytest
import torch

from potluck.models import LocalCausalLM
from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.config import ServerConfig
from potluck.server.handlers import ServerState
from potluck.server.runtime import Runtime
from potluck.server.scheduler import StepRequest, gather_until, plan_batch
from potluck.server.sessions import Session, SessionClosedError
from potluck.server.tuning import TuningInputs
from potluck.wire import DEFAULT_LIMITS


def _request(peer: str, tokens: int, group: Any = "g", rows: int = 1) -> StepRequest:
    session = Session(
        id=f"{peer}-{random.random()}", peer=peer, span=None, batch_size=rows, max_length=64,  # type: ignore[arg-type]
        tuning=TuningInputs(), group=group,
    )  # fmt: skip
    return StepRequest(session, torch.zeros(rows, tokens, 4), 0, None, None, future=None)  # type: ignore[arg-type]


def _pending(requests: list[StepRequest]) -> dict[str, collections.deque[StepRequest]]:
    out: dict[str, collections.deque[StepRequest]] = {}
    for r in requests:
        out.setdefault(r.session.peer, collections.deque()).append(r)
    return out


def test_plan_batch_is_round_robin_between_client_peers() -> None:
    a = [_request("A", 1) for _ in range(4)]
    b = [_request("B", 1)]
    slots = plan_batch(_pending(a + b), ["A", "B"], budget=2)
    assert [s.request for s in slots] == [a[0], b[0]]  # A's many sessions do not push B out
    slots = plan_batch(_pending(a + b), ["B", "A"], budget=3)
    assert [s.request for s in slots] == [b[0], a[0], a[1]]


def test_plan_batch_puts_decode_steps_first_and_chunks_prefills() -> None:
    prefill = _request("A", 10)
    decodes = [_request("B", 1), _request("C", 1, rows=2)]
    slots = plan_batch(_pending([prefill, *decodes]), ["A", "B", "C"], budget=6)
    assert [(s.request, s.tokens) for s in slots] == [(decodes[0], 1), (decodes[1], 1), (prefill, 3)]
    # a prefill alone still gets the whole budget, and a request wider than the budget still runs
    assert [s.tokens for s in plan_batch(_pending([prefill]), ["A"], budget=4)] == [4]
    assert [s.tokens for s in plan_batch(_pending([_request("A", 3, rows=8)]), ["A"], budget=4)] == [1]


def test_plan_batch_takes_one_group() -> None:
    x = _request("A", 1, group="adapter-x")
    y = _request("B", 1, group="adapter-y")
    x2 = _request("C", 1, group="adapter-x")
    slots = plan_batch(_pending([x, y, x2]), ["A", "B", "C"], budget=16)
    assert [s.request for s in slots] == [x, x2]


def _leading(requests: list[StepRequest]) -> list[StepRequest]:
    for r in requests:
        r.session.leads_chain = True
    return requests


def test_the_first_stage_waits_for_every_session_it_leads() -> None:
    steps = _leading([_request(f"P{i}", 1) for i in range(4)])
    recent = {r.session: 0.0 for r in steps}  # each sent its latest step at t=0
    periods = {r.session: 0.1 for r in steps}  # and steps every 100 ms

    def until(
        queued: list[StepRequest], now: float = 0.05, deadline: float = 0.13, **kw: Any
    ) -> float | None:
        return gather_until(
            _pending(queued), kw.get("recent", recent), kw.get("periods", periods), now, deadline, 0.0
        )

    assert until(steps[:1]) == pytest.approx(0.13)  # 3 of 4 missing: wait, at most until the deadline
    assert until(steps[:3]) == pytest.approx(0.13)  # even one missing
    assert until(steps) is None  # all queued: run
    assert until(steps[:1], now=0.13) is None  # the deadline came
    # a session that missed two of its turns has stopped (a chat waiting for its user): not waited for
    assert until(steps[:1], now=0.21, deadline=0.3) is None
    assert until(steps[:1], periods={}) == pytest.approx(0.13)  # no period yet (one step so far): waited for
    lone = steps[0]
    assert until([lone], recent={lone.session: 0.0}) is None  # a lone session never waits
    assert until([]) is None
    prefill = _leading([_request("P9", 5)])[0]
    assert until([steps[0], prefill]) is None  # a prefill runs at once
    other = _leading([_request("P8", 1, group="adapter-x")])[0]  # sessions of another group do not count
    assert until(steps[:1], recent={lone.session: 0.0, other.session: 0.0}) is None


def test_a_later_stage_waits_only_for_the_rest_of_a_burst() -> None:
    steps = [_request(f"P{i}", 1) for i in range(4)]  # they reach this server from a previous one
    recent = {r.session: 0.0 for r in steps}
    periods = {r.session: 0.1 for r in steps}
    # the latest arrival at 0.048: the burst may go on until 6 ms of quiet
    assert gather_until(_pending(steps[:1]), recent, periods, 0.05, 0.13, 0.048) == pytest.approx(0.054)
    assert gather_until(_pending(steps[:1]), recent, periods, 0.06, 0.13, 0.048) is None  # quiet: run
    assert gather_until(_pending(steps), recent, periods, 0.05, 0.13, 0.048) is None  # all here
    # a server that leads some sessions and relays others: while a relayed step is queued it does not wait for
    # its missing leaders (the server holding them may be waiting for the relayed ones we hold)
    leaders = _leading([_request(f"L{i}", 1) for i in range(2)])
    both = {**recent, **{r.session: 0.0 for r in leaders}}
    periods.update({r.session: 0.1 for r in leaders})
    assert gather_until(_pending([*steps, leaders[0]]), both, periods, 0.05, 0.13, 0.048) is None
    assert gather_until(_pending(leaders[:1]), both, periods, 0.05, 0.13, 0.048) == pytest.approx(0.13)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> LocalCausalLM:
    return LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))


def _state(model: LocalCausalLM, runtime: Runtime, **config: Any) -> ServerState:
    return ServerState(
        config=ServerConfig(model="tiny", **config),
        model_prefix="tiny",
        span=model.span,
        runtime=runtime,
        budget=CacheBudget(config.get("cache_tokens", 4096)),
        limits=DEFAULT_LIMITS,
    )


async def _open(state: ServerState, peer: str, max_length: int = 64, batch: int = 1) -> Session:
    span = state.span
    return await state.sessions.open(
        peer=peer, span=span, batch_size=batch, max_length=max_length, tuning=TuningInputs(), adapter=None,
        alloc_timeout=1.0, make_cache=lambda: state.compute(0, lambda: span.new_cache(batch, max_length)),
    )  # fmt: skip


def _hidden(model: LocalCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.client.pre_blocks(model.client.embed(ids))


def test_sessions_joining_and_leaving_mid_batch_change_no_output(model: LocalCausalLM) -> None:
    """Sessions with different prompt lengths start at different steps and leave early; every step's output
    equals what that session computes alone (greedy decoding on the step outputs, so a difference would show)."""
    plans = [(7, 0, 12), (3, 0, 6), (11, 2, 10), (5, 4, 3), (9, 5, 12), (2, 1, 9)]  # (prompt, start, new)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (1, n), generator=gen) for n, _, _ in plans]

    def alone(prompt: torch.Tensor, new: int) -> list[int]:
        cache = model.new_cache(1, 64)
        out, ids = [], prompt
        with torch.inference_mode():
            for _ in range(new):
                ids = model.step(ids, cache)[:, -1:].argmax(-1)  # [1, 1]
                out.append(int(ids))
        return out

    expected = [alone(p, new) for p, (_, _, new) in zip(prompts, plans, strict=True)]

    async def main() -> tuple[list[list[int]], ServerState]:
        runtime = Runtime()
        state = _state(model, runtime, step_token_budget=8)  # prefills of 9 and 11 tokens are chunked

        async def client(i: int) -> list[int]:
            prompt, (_, start, new) = prompts[i], plans[i]
            for _ in range(start * 3):  # join later than the others
                await asyncio.sleep(0.002)
            session = await _open(state, peer=f"peer-{i % 3}")
            ids, out = prompt, []
            for _ in range(new):
                hidden = await state.scheduler.step(session, _hidden(model, ids), session.length)
                ids = model.client.head(hidden)[:, -1:].argmax(-1)
                out.append(int(ids))
            state.sessions.close(session)  # leaves while the others keep going
            return out

        try:
            got = await asyncio.gather(*(client(i) for i in range(len(plans))))
        finally:
            runtime.shutdown()
        return list(got), state

    got, state = asyncio.run(main())
    assert got == expected
    assert state.scheduler.max_batch_sessions >= 3  # steps really ran together
    assert state.budget.used == 0 and len(state.sessions) == 0


def test_move_closes_sessions_and_frees_their_cache_at_once(model: LocalCausalLM) -> None:
    async def main() -> None:
        runtime = Runtime()
        state = _state(model, runtime, cache_tokens=1024, peer_cache_tokens=1024)
        try:
            sessions = [await _open(state, f"peer-{i}", max_length=100) for i in range(3)]
            for s in sessions:
                await state.scheduler.step(s, _hidden(model, torch.tensor([[1, 2, 3]])), 0)
            assert state.budget.used == 300
            buffers = [weakref.ref(s.cache.keys[0]) for s in sessions if s.cache is not None]
            assert state.close_sessions("wrong_span", "moved") == 3  # what Server._move calls first
            assert state.budget.used == 0 and state.budget.left == 1024  # at once, no step needed
            gc.collect()
            assert all(ref() is None for ref in buffers)  # the KV memory itself is gone
            with pytest.raises(SessionClosedError) as closed:
                await state.scheduler.step(sessions[0], _hidden(model, torch.tensor([[4]])), 3)
            assert closed.value.code == "wrong_span"
            await _open(state, "peer-new", max_length=1000)  # the whole budget is usable again
        finally:
            runtime.shutdown()

    asyncio.run(main())


def test_per_client_peer_cache_bound(model: LocalCausalLM) -> None:
    async def main() -> None:
        runtime = Runtime()
        state = _state(model, runtime, cache_tokens=1000, peer_cache_tokens=300)
        try:
            await _open(state, "greedy", max_length=200)
            with pytest.raises(CacheFullError, match="per-client bound"):
                await _open(state, "greedy", max_length=200)
            await _open(state, "other", max_length=300)  # other clients still get room
            assert state.sessions.tokens_of("greedy") == 200
        finally:
            runtime.shutdown()

    asyncio.run(main())


async def _late(steps: Any) -> None:
    await asyncio.sleep(0.03)
    await steps()


def test_a_decode_batch_waits_for_the_other_decoding_sessions(model: LocalCausalLM) -> None:
    """Three sessions this server leads decode together; two of them reach the server 30 ms after the first. With
    a wait they run as one batch each step; without one, the first runs alone. Outputs are exact either way."""

    async def run(batch_wait_ms: float) -> tuple[list[list[int]], int, int]:
        runtime = Runtime()
        state = _state(model, runtime, batch_wait_ms=batch_wait_ms)
        sessions = [await _open(state, peer=f"peer-{i}") for i in range(3)]
        for session in sessions:
            session.leads_chain = True  # their clients send each step here first
        ids = [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 8]]), torch.tensor([[4]])]
        out: list[list[int]] = [[], [], []]

        async def step(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            hidden = await state.scheduler.step(sessions[i], _hidden(model, ids[i]), sessions[i].length)
            ids[i] = model.client.head(hidden)[:, -1:].argmax(-1)
            out[i].append(int(ids[i]))

        try:
            await asyncio.gather(step(0, 0), step(1, 0), step(2, 0))  # prefills (never wait)
            batches = state.scheduler.batches
            for _ in range(4):
                # the two late steps start in one loop iteration, so both are queued when the batch looks
                await asyncio.gather(step(0, 0), _late(lambda: asyncio.gather(step(1, 0), step(2, 0))))
            return out, state.scheduler.batches - batches, state.scheduler.max_batch_sessions
        finally:
            runtime.shutdown()

    waited, waited_batches, most = asyncio.run(run(batch_wait_ms=5000))
    alone, alone_batches, _ = asyncio.run(run(batch_wait_ms=0))
    assert waited == alone
    assert waited_batches == 4 and most == 3
    assert alone_batches >= 8


def test_a_lone_decoding_session_never_waits(model: LocalCausalLM) -> None:
    async def main() -> int:
        runtime = Runtime()
        state = _state(model, runtime, batch_wait_ms=3_600_000)  # waiting at all would hang past the timeout
        session = await _open(state, peer="solo")
        ids = torch.tensor([[1, 2, 3]])
        try:
            for _ in range(5):
                hidden = await asyncio.wait_for(
                    state.scheduler.step(session, _hidden(model, ids), session.length), timeout=30
                )
                ids = model.client.head(hidden)[:, -1:].argmax(-1)
            return state.scheduler.batches
        finally:
            runtime.shutdown()

    assert asyncio.run(main()) == 5
