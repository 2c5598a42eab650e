"""Forward and backward through remote blocks without a KV cache (``model(...)`` calls and training).

``RemoteBlocksFunction`` is an autograd function over the whole chain. Forward splits the batch into chunks
that travel the chain concurrently (pipelining across servers), keeping each hop's input; backward walks
each chunk's chain in reverse asking the same servers for input gradients (and gradients of the client's
prompts and LoRA adapters). A hop that fails in either direction is replaced by a fresh chain over the same
blocks; on backward the replacement first re-runs the forward of that range (its input is known).
Failures are classified and handled by the same policy as inference sessions (``failures.py``), and each
forward or backward call has one deadline (``request_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from potluck.client.failures import (
    CONNECTION_ERRORS,
    Failover,
    HopFailure,
    call_deadline,
    failure_from_exception,
    failure_from_reply,
    unexpected_reply,
)
from potluck.client.loop import LoopThread
from potluck.client.swarm_view import SwarmView
from potluck.client.tuning import TuningPayload
from potluck.swarm.routing import RouteHop, RouteRequirements
from potluck.wire import (
    PROTOCOL_BACKWARD,
    PROTOCOL_FORWARD,
    BackwardRequest,
    BackwardResult,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_CHUNK = 1024  # batch rows are grouped into chunks of at most this many tokens
# A blocking wait on the client loop outlives the call's own deadline by this much, so the call reports its
# DeadlineExceededError itself; the wait only ends first if the loop thread is stuck.
LOOP_GRACE = 10.0

T = TypeVar("T")


@dataclass
class HopTrace:
    """One hop of a forward: the input it was given and the id of the graph the server kept (if any)."""

    hop: RouteHop
    input: torch.Tensor  # [B, T, H]
    activation_id: str | None = None


@dataclass
class ChunkTrace:
    """The hops one chunk of the batch went through."""

    rows: slice
    hops: list[HopTrace]


class RemoteBlocks:
    """Stateless calls over blocks [0, num_blocks) of the swarm's model."""

    def __init__(self, view: SwarmView, fingerprint: str | None = None):
        self.view = view
        self.fingerprint = fingerprint  # the client's checkpoint fingerprint: servers must announce the same

    def needs(self, tuning: TuningPayload, hidden: torch.Tensor) -> RouteRequirements:
        """What every server of a forward/backward of ``hidden`` [B, T, H] must offer."""
        rows = max(1, MAX_TOKENS_PER_CHUNK // max(1, hidden.shape[1]))
        return RouteRequirements(
            adapter=tuning.active_adapter,
            batch_tokens=min(rows, hidden.shape[0]) * hidden.shape[1],
            fingerprint=self.fingerprint,
        )

    async def _call(
        self, hop: RouteHop, request: Any, tensors: list[torch.Tensor]
    ) -> tuple[Any, list[torch.Tensor]]:
        cfg = self.view.config
        protocol = PROTOCOL_FORWARD if isinstance(request, ForwardRequest) else PROTOCOL_BACKWARD
        expected = ForwardResult if isinstance(request, ForwardRequest) else BackwardResult
        try:
            reader, writer = await self.view.open_stream(hop.peer_id, protocol, timeout=cfg.connect_timeout)
            try:
                async with asyncio.timeout(cfg.step_timeout):  # a frozen server: go elsewhere
                    await write_message(writer, request, tensors, cfg.compression)
                    msg, out = await read_message(reader)
            finally:
                writer.close()
        except CONNECTION_ERRORS as e:
            raise failure_from_exception(
                hop.peer_id, e, f"{request.kind} (step_timeout {cfg.step_timeout}s)"
            ) from e
        if isinstance(msg, ErrorReply):
            raise failure_from_reply(hop.peer_id, msg)
        if not isinstance(msg, expected):
            raise unexpected_reply(hop.peer_id, request.kind)
        self.view.clear_ban(hop.peer_id)
        return msg, out

    async def forward_hop(
        self, hop: RouteHop, hidden: torch.Tensor, tuning: TuningPayload, *, keep: bool = False
    ) -> tuple[torch.Tensor, str | None]:
        """The hop's output and, with ``keep``, the id of the autograd graph the server kept for backward."""
        header, extra = tuning.for_hop(hop)
        req = ForwardRequest(
            model=self.view.model_prefix,
            start=hop.start,
            end=hop.end,
            tuning=header,
            output_compression=self.view.config.compression,  # type: ignore[arg-type]
            keep_activations=keep,
        )
        msg, outs = await self._call(hop, req, [hidden, *extra])
        if len(outs) != 1 or outs[0].shape != hidden.shape:
            raise unexpected_reply(hop.peer_id, "forward_request")
        return outs[0], getattr(msg, "activation_id", None)

    async def backward_hop(
        self,
        hop: RouteHop,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        tuning: TuningPayload,
        activation_id: str | None = None,
    ) -> list[torch.Tensor]:
        """[grad_in, *gradients of the hop's slice of the tuning tensors]."""
        header, extra = tuning.for_hop(hop)
        req = BackwardRequest(
            model=self.view.model_prefix,
            start=hop.start,
            end=hop.end,
            tuning=header,
            output_compression=self.view.config.compression,  # type: ignore[arg-type]
            activation_id=activation_id,
        )
        _, grads = await self._call(hop, req, [hidden, grad_out, *extra])
        if len(grads) != 1 + len(extra) or grads[0].shape != hidden.shape:
            raise unexpected_reply(hop.peer_id, "backward_request")
        return grads

    # --- one chunk ------------------------------------------------------------------------------------

    async def forward_range(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        tuning: TuningPayload,
        failover: Failover,
        *,
        keep: bool = False,
    ) -> tuple[torch.Tensor, list[HopTrace]]:
        """Run [start, end) on ``hidden`` [B, T, H]; returns the output and each hop's trace."""
        trace: list[HopTrace] = []
        block, x = start, hidden
        while block < end:
            hops = await failover.route(block, end, inference=False)
            for hop in hops:
                try:
                    out, activation_id = await self.forward_hop(hop, x, tuning, keep=keep)
                except HopFailure as e:
                    await failover.handle(e)
                    break  # re-route from ``block``
                trace.append(HopTrace(hop, x, activation_id))
                x, block = out, hop.end
        return x, trace

    async def backward_range(
        self,
        trace: list[HopTrace],
        grad_out: torch.Tensor,
        tuning: TuningPayload,
        tuning_grads: list[torch.Tensor],
        failover: Failover,
    ) -> torch.Tensor:
        """Gradient w.r.t. the first hop's input; tuning gradients are added into ``tuning_grads``."""
        grad = grad_out
        for step in reversed(trace):
            grad = await self._backward_hop_with_failover(step, grad, tuning, tuning_grads, failover)
        return grad

    async def _backward_hop_with_failover(
        self,
        step: HopTrace,
        grad_out: torch.Tensor,
        tuning: TuningPayload,
        tuning_grads: list[torch.Tensor],
        failover: Failover,
    ) -> torch.Tensor:
        try:
            grads = await self.backward_hop(step.hop, step.input, grad_out, tuning, step.activation_id)
            tuning.accumulate(tuning_grads, step.hop, grads[1:])
            return grads[0]
        except HopFailure as e:
            await failover.handle(e)
        hop = step.hop
        while True:
            # Replacement servers: re-run the failed range's forward to learn their inputs, then backward.
            try:
                _, sub_trace = await self.forward_range(
                    step.input, hop.start, hop.end, tuning, failover, keep=True
                )
                partial = [torch.zeros_like(g) for g in tuning_grads]
                grad = grad_out
                for sub in reversed(sub_trace):
                    grads = await self.backward_hop(sub.hop, sub.input, grad, tuning, sub.activation_id)
                    tuning.accumulate(partial, sub.hop, grads[1:])
                    grad = grads[0]
                for full, part in zip(tuning_grads, partial, strict=True):
                    full += part
                return grad
            except HopFailure as e:
                await failover.handle(e)

    # --- whole batches, chunked and concurrent ----------------------------------------------------------

    async def forward(
        self, hidden: torch.Tensor, tuning: TuningPayload, *, keep: bool = False
    ) -> tuple[torch.Tensor, list[ChunkTrace]]:
        n = self.view.num_blocks
        what = f"forward of {tuple(hidden.shape)} hidden states over blocks 0:{n}"
        failover = Failover(self.view, self.needs(tuning, hidden), what)
        rows_per_chunk = max(1, MAX_TOKENS_PER_CHUNK // max(1, hidden.shape[1]))
        chunks = [
            slice(i, min(i + rows_per_chunk, hidden.shape[0]))
            for i in range(0, hidden.shape[0], rows_per_chunk)
        ]
        async with call_deadline(self.view.config.request_timeout, what):
            results = await _all_or_nothing(
                [self.forward_range(hidden[rows], 0, n, tuning, failover, keep=keep) for rows in chunks]
            )
        out = torch.cat([r[0] for r in results], dim=0)  # [B, T, H]
        return out, [ChunkTrace(rows, r[1]) for rows, r in zip(chunks, results, strict=True)]

    async def backward(
        self, traces: list[ChunkTrace], grad_out: torch.Tensor, tuning: TuningPayload
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        what = f"backward of {tuple(grad_out.shape)} gradients over blocks 0:{self.view.num_blocks}"
        failover = Failover(self.view, self.needs(tuning, grad_out), what)
        tuning_grads = [torch.zeros_like(t, dtype=torch.float32) for t in tuning.trainable()]
        per_chunk = [[torch.zeros_like(g) for g in tuning_grads] for _ in traces]
        async with call_deadline(self.view.config.request_timeout, what):
            grads_in = await _all_or_nothing(
                [
                    self.backward_range(trace.hops, grad_out[trace.rows], tuning, acc, failover)
                    for trace, acc in zip(traces, per_chunk, strict=True)
                ]
            )
        for acc in per_chunk:
            for full, part in zip(tuning_grads, acc, strict=True):
                full += part
        return torch.cat(list(grads_in), dim=0), tuning_grads


async def _all_or_nothing(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first error cancel the others and raise that error (not a group)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RemoteBlocksFunction(torch.autograd.Function):
    """Autograd over the whole remote chain: (hidden [B, T, H], *tuning tensors) -> hidden [B, T, H]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        blocks: RemoteBlocks,
        loop: LoopThread,
        tuning: TuningPayload,
        *leaves: Any,
    ) -> torch.Tensor:
        keep = any(ctx.needs_input_grad)  # a backward will follow: servers keep their graphs for it
        # The deadline is inside the call (request_timeout); the loop only guards against a stuck loop.
        timeout = blocks.view.config.request_timeout + LOOP_GRACE
        out, traces = loop.run(blocks.forward(hidden.detach(), tuning, keep=keep), timeout=timeout)
        ctx.blocks, ctx.loop, ctx.traces, ctx.tuning, ctx.dtype = blocks, loop, traces, tuning, hidden.dtype
        ctx.leaf_dtypes = [leaf.dtype for leaf in leaves]
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        timeout = ctx.blocks.view.config.request_timeout + LOOP_GRACE
        grad_in, tuning_grads = ctx.loop.run(
            ctx.blocks.backward(ctx.traces, grad_out.contiguous(), ctx.tuning), timeout=timeout
        )
        leaf_grads = [g.to(dt) for g, dt in zip(tuning_grads, ctx.leaf_dtypes, strict=True)]
        return (grad_in.to(ctx.dtype), None, None, None, *leaf_grads)


def remote_blocks(
    hidden: torch.Tensor, blocks: RemoteBlocks, loop: LoopThread, tuning: TuningPayload | None = None
) -> torch.Tensor:
    """hidden [B, T, H] through every remote block; differentiable w.r.t. hidden and the tuning tensors."""
    tuning = tuning or TuningPayload()
    out: torch.Tensor = RemoteBlocksFunction.apply(hidden, blocks, loop, tuning, *tuning.trainable())
    return out
