"""Forward and backward through remote blocks without a KV cache (``model(...)`` calls and training).

``RemoteBlocksFunction`` is an autograd function: forward sends hidden states through a chain of servers and
keeps each hop's input; backward walks the chain in reverse asking each server for input gradients. A hop
that fails in either direction is replaced by a fresh chain over the same blocks; on backward, the
replacement first re-runs the forward of that range (its inputs are known) and then its backward.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from potluck.client.inference import ServerFailure
from potluck.client.loop import LoopThread
from potluck.client.swarm_view import SwarmView
from potluck.server.handlers import PROTOCOL_BACKWARD, PROTOCOL_FORWARD
from potluck.swarm.routing import RouteHop
from potluck.wire import (
    BackwardRequest,
    BackwardResult,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    ProtocolError,
    StreamClosed,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)


class RemoteBlocks:
    """Stateless calls over blocks [0, num_blocks) of the swarm's model."""

    def __init__(self, view: SwarmView):
        self.view = view

    async def _call(self, hop: RouteHop, request: Any, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        cfg = self.view.config
        protocol = PROTOCOL_FORWARD if isinstance(request, ForwardRequest) else PROTOCOL_BACKWARD
        expected = ForwardResult if isinstance(request, ForwardRequest) else BackwardResult
        try:
            reader, writer = await self.view.node.open_stream(
                hop.peer_id, protocol, timeout=cfg.connect_timeout
            )
            try:
                await asyncio.wait_for(
                    write_message(writer, request, tensors, cfg.compression), cfg.request_timeout
                )
                msg, out = await read_message(reader, timeout=cfg.request_timeout)
            finally:
                writer.close()
        except TimeoutError:
            raise ServerFailure(hop.peer_id, f"no reply within {cfg.request_timeout}s") from None
        except (StreamClosed, ProtocolError, OSError, asyncio.IncompleteReadError) as e:
            raise ServerFailure(hop.peer_id, f"connection lost: {type(e).__name__}: {e}") from e
        except Exception as e:  # p2pd's own errors for unreachable peers
            raise ServerFailure(hop.peer_id, f"{type(e).__name__}: {e}") from e
        if isinstance(msg, ErrorReply):
            raise ServerFailure(hop.peer_id, f"{msg.code}: {msg.message}")
        if not isinstance(msg, expected):
            raise ServerFailure(hop.peer_id, f"unexpected reply {getattr(msg, 'kind', msg)!r}")
        self.view.clear_ban(hop.peer_id)
        return out

    async def forward_hop(self, hop: RouteHop, hidden: torch.Tensor) -> torch.Tensor:
        req = ForwardRequest(
            model=self.view.model_prefix,
            start=hop.start,
            end=hop.end,
            output_compression=self.view.config.compression,  # type: ignore[arg-type]
        )
        (out,) = await self._call(hop, req, [hidden])
        return out

    async def backward_hop(self, hop: RouteHop, hidden: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        req = BackwardRequest(
            model=self.view.model_prefix,
            start=hop.start,
            end=hop.end,
            output_compression=self.view.config.compression,  # type: ignore[arg-type]
        )
        (grad_in,) = await self._call(hop, req, [hidden, grad_out])
        return grad_in

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, list[tuple[RouteHop, torch.Tensor]]]:
        """Run [start, end) on ``hidden`` [B, T, H]; returns the output and (hop, hop input) pairs."""
        trace: list[tuple[RouteHop, torch.Tensor]] = []
        block, x, failures = start, hidden, 0
        while block < end:
            hops = await self.view.route(block, end, batch_tokens=0, inference=False)
            for hop in hops:
                try:
                    out = await self.forward_hop(hop, x)
                except ServerFailure as e:
                    failures += 1
                    self._on_failure(e, failures)
                    break  # re-route from ``block``
                trace.append((hop, x))
                x, block = out, hop.end
        return x, trace

    async def backward(
        self, trace: list[tuple[RouteHop, torch.Tensor]], grad_out: torch.Tensor
    ) -> torch.Tensor:
        """Gradient w.r.t. the input of ``trace``'s first hop, given the gradient of its last hop's output."""
        grad = grad_out
        for hop, hop_input in reversed(trace):
            grad = await self._backward_range(hop, hop_input, grad)
        return grad

    async def _backward_range(
        self, hop: RouteHop, hop_input: torch.Tensor, grad_out: torch.Tensor
    ) -> torch.Tensor:
        failures = 0
        try:
            return await self.backward_hop(hop, hop_input, grad_out)
        except ServerFailure as e:
            failures += 1
            self._on_failure(e, failures)
        while True:
            # Re-run the forward of the failed range on replacement servers to learn their inputs, then backward.
            try:
                _, sub_trace = await self.forward(hop_input, hop.start, hop.end)
                grad = grad_out
                for sub_hop, sub_input in reversed(sub_trace):
                    grad = await self.backward_hop(sub_hop, sub_input, grad)
                return grad
            except ServerFailure as e:
                failures += 1
                self._on_failure(e, failures)

    def _on_failure(self, failure: ServerFailure, failures: int) -> None:
        self.view.ban(failure.peer_id, str(failure))
        if failures > self.view.config.max_retries:
            raise RuntimeError(f"gave up after {failures - 1} retries: {failure}") from failure


class RemoteBlocksFunction(torch.autograd.Function):
    """Autograd over the whole remote chain: inputs [B, T, H] -> outputs [B, T, H]."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, blocks: RemoteBlocks, loop: LoopThread) -> torch.Tensor:  # type: ignore[override]
        n = blocks.view.num_blocks
        timeout = blocks.view.config.request_timeout * 4
        out, trace = loop.run(blocks.forward(hidden.detach(), 0, n), timeout=timeout)
        ctx.blocks, ctx.loop, ctx.trace, ctx.dtype = blocks, loop, trace, hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        timeout = ctx.blocks.view.config.request_timeout * 4
        grad_in = ctx.loop.run(ctx.blocks.backward(ctx.trace, grad_out.contiguous()), timeout=timeout)
        return grad_in.to(ctx.dtype), None, None
