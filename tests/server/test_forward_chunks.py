"""Large forwards/backwards run in pieces: outputs and gradients stay exact, and a decode step of another client
submitted during a flood of large forwards runs after at most one piece (checked by order, never by time)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch

from potluck.models import LORA_TARGETS, LocalCausalLM, LoraConfig, LoraWeights
from potluck.server.cache_budget import CacheBudget
from potluck.server.config import ServerConfig
from potluck.server.forward_chunks import Piece, plan_pieces
from potluck.server.handlers import ServerState
from potluck.server.runtime import PRIORITY_FORWARD, PRIORITY_INFERENCE, Runtime
from potluck.server.tuning import TuningInputs
from potluck.wire import DEFAULT_LIMITS

T = TypeVar("T")


def test_plan_pieces_cuts_rows_then_tokens_and_covers_everything_once() -> None:
    # rows first: 1024 // 100 = 10 rows per piece
    assert [p.rows for p in plan_pieces(25, 100, 1024, split_tokens=False)] == [
        slice(0, 10), slice(10, 20), slice(20, 25),
    ]  # fmt: skip
    # a single row longer than the piece is cut along tokens only when allowed (no graph)
    assert plan_pieces(2, 2500, 1024, split_tokens=True) == [
        Piece(slice(r, r + 1), slice(t, min(t + 1024, 2500))) for r in (0, 1) for t in (0, 1024, 2048)
    ]
    assert [p.tokens for p in plan_pieces(2, 2500, 1024, split_tokens=False)] == [slice(0, 2500)] * 2
    for batch, tokens, chunk in [(7, 13, 20), (3, 50, 16), (1, 1, 8), (16, 64, 1024)]:
        pieces = plan_pieces(batch, tokens, chunk, split_tokens=True)
        covered = torch.zeros(batch, tokens, dtype=torch.int32)
        for p in pieces:
            covered[p.rows, p.tokens] += 1
            assert (
                p.size() <= chunk or p.size() == p.tokens.stop - p.tokens.start
            )  # one row at most one chunk
        assert bool((covered == 1).all())


class TracingRuntime(Runtime):
    """Records, in order, when a closure is queued (event loop) and when it starts (compute thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    async def run(self, priority: int, fn: Callable[[], T]) -> T:
        def traced() -> T:
            self.trace.append(("start", priority))
            self.gate.wait()
            return fn()

        self.trace.append(("queued", priority))
        return await super().run(priority, traced)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> LocalCausalLM:
    return LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))


def _state(model: LocalCausalLM, runtime: Runtime, chunk: int) -> ServerState:
    return ServerState(
        config=ServerConfig(model="tiny", forward_chunk_tokens=chunk),
        model_prefix="tiny",
        span=model.span,
        runtime=runtime,
        budget=CacheBudget(4096),
        limits=DEFAULT_LIMITS,
    )


def _tuning(model: LocalCausalLM, batch: int) -> TuningInputs:
    """Deep prompts per row and a sent LoRA adapter: both get gradients, both must be sliced right."""
    gen = torch.Generator().manual_seed(1)
    spec = model.spec
    prompts = 0.1 * torch.randn(spec.num_blocks, batch, 3, spec.hidden_size, generator=gen)
    config = LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS["llama"][:2])
    lora = LoraWeights.init_random(spec, config, 0, spec.num_blocks, generator=gen)
    return TuningInputs(prompts=prompts, lora=lora, sent_lora=True)


def test_split_forward_and_backward_equal_the_unsplit_ones(model: LocalCausalLM) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, tokens = 5, 24
    hidden = torch.randn(batch, tokens, model.spec.hidden_size, generator=gen)  # [B, T, H]
    grad_out = torch.randn(batch, tokens, model.spec.hidden_size, generator=gen)
    tuning = _tuning(model, batch)
    span = model.span

    # the oracle: the whole request at once, as the handlers did before
    with torch.inference_mode():
        plain = span(hidden, prompts=tuning.prompts, lora=tuning.lora)
    x = hidden.clone().requires_grad_(True)
    graph = tuning.requires_grad_()
    out = span(x, prompts=graph.prompts, lora=graph.lora)
    expected_grads = torch.autograd.grad(out, [x, *graph.leaves()], grad_out)

    async def main() -> tuple[Any, ...]:
        runtime = TracingRuntime()
        try:
            state = _state(model, runtime, chunk=20)  # 1 row (24 tokens) per piece; forwards cut along tokens
            no_grad, _ = await state.chunked.forward(PRIORITY_FORWARD, span, hidden, tuning, keep=False)
            pieces_no_grad = sum(1 for e in runtime.trace if e == ("start", PRIORITY_FORWARD))
            kept_out, key = await state.chunked.forward(PRIORITY_FORWARD, span, hidden, tuning, keep=True)
            assert key is not None and len(state.activations) == 1
            from_kept = await state.chunked.backward(PRIORITY_FORWARD, span, hidden, grad_out, tuning, key)
            assert len(state.activations) == 0  # popped
            recomputed = await state.chunked.backward(PRIORITY_FORWARD, span, hidden, grad_out, tuning, None)
            return no_grad, pieces_no_grad, kept_out, from_kept, recomputed
        finally:
            runtime.shutdown()

    no_grad, pieces_no_grad, kept_out, from_kept, recomputed = asyncio.run(main())
    assert pieces_no_grad == batch * 2  # 5 rows x (20 + 4 tokens): really split, along both axes
    torch.testing.assert_close(no_grad, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept_out, plain, rtol=1e-5, atol=1e-5)
    assert len(from_kept) == len(expected_grads) == 1 + 1 + 2 * 2  # hidden, prompts, A and B of two targets
    for grads in (from_kept, recomputed):
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_decode_step_waits_at_most_one_piece_of_a_forward_flood(model: LocalCausalLM) -> None:
    """Two clients flood large forwards; a third client's decode step queued mid-flood runs next (after at most
    the piece in progress), while the flood goes on after it."""
    hidden_size = model.spec.hidden_size
    gen = torch.Generator().manual_seed(0)
    flood = [torch.randn(4, 32, hidden_size, generator=gen) for _ in range(2)]  # 128 tokens each, 8 pieces

    async def main() -> list[tuple[str, int]]:
        runtime = TracingRuntime()
        try:
            state = _state(model, runtime, chunk=16)
            span = model.span
            session = await state.sessions.open(
                peer="decoder", span=span, batch_size=1, max_length=8, tuning=TuningInputs(), adapter=None,
                alloc_timeout=1.0, make_cache=lambda: state.compute(0, lambda: span.new_cache(1, 8)),
            )  # fmt: skip
            runtime.trace.clear()
            runtime.gate.clear()  # hold the compute thread until both floods have queued their first piece
            floods = [
                asyncio.create_task(
                    state.chunked.forward(PRIORITY_FORWARD, span, h, TuningInputs(), keep=False)
                )
                for h in flood
            ]
            while runtime.trace.count(("queued", PRIORITY_FORWARD)) < 2:
                await asyncio.sleep(0)
            runtime.gate.set()
            while runtime.trace.count(("start", PRIORITY_FORWARD)) < 3:  # the flood is under way
                await asyncio.sleep(0.001)
            step = asyncio.create_task(state.scheduler.step(session, torch.randn(1, 1, hidden_size), 0))
            await asyncio.gather(step, *floods)
            return list(runtime.trace)
        finally:
            runtime.shutdown()

    trace = asyncio.run(main())
    queued = trace.index(("queued", PRIORITY_INFERENCE))
    started = trace.index(("start", PRIORITY_INFERENCE))
    between = trace[queued:started].count(("start", PRIORITY_FORWARD))
    assert between <= 1  # only the piece the compute thread had already taken
    assert trace.count(("start", PRIORITY_FORWARD)) == 2 * 8  # every forward ran in 8 pieces of 16 tokens
    assert trace[started:].count(("start", PRIORITY_FORWARD)) >= 4  # and the flood went on after the step
