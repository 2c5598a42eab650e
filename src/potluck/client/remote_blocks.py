"""Forward and backward through remote blocks without a KV cache (``model(...)`` calls and training).

``RemoteBlocksFunction`` is an autograd function over the whole chain. Forward splits the batch into chunks
that travel the chain concurrently (pipelining across servers), keeping each hop's input; backward walks
each chunk's chain in reverse asking the same servers for input gradients (and gradients of the client's
prompts and LoRA adapters). A hop that fails in either direction is replaced by a fresh chain over the same
blocks; on backward the replacement first re-runs the forward of that range (its input is known).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import torch

from potluck.client.inference import ServerFailure
from potluck.client.loop import LoopThread
from potluck.client.swarm_view import SwarmView
from potluck.client.tuning import TuningPayload
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

MAX_TOKENS_PER_CHUNK = 1024  # batch rows are grouped into chunks of at most this many tokens


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

    def __init__(self, view: SwarmView):
        self.view = view

    async def _call(
        self, hop: RouteHop, request: Any, tensors: list[torch.Tensor]
    ) -> tuple[Any, list[torch.Tensor]]:
        cfg = self.view.config
        protocol = PROTOCOL_FORWARD if isinstance(request, ForwardRequest) else PROTOCOL_BACKWARD
        expected = ForwardResult if isinstance(request, ForwardRequest) else BackwardResult
        try:
            reader, writer = await self.view.open_stream(hop.peer_id, protocol, timeout=cfg.connect_timeout)
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
            if not msg.retryable and msg.code == "bad_request":
                raise ValueError(f"server {hop.peer_id[-8:]} rejected the request: {msg.message}")
            raise ServerFailure(hop.peer_id, f"{msg.code}: {msg.message}")
        if not isinstance(msg, expected):
            raise ServerFailure(hop.peer_id, f"unexpected reply {getattr(msg, 'kind', msg)!r}")
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
        msg, (out,) = await self._call(hop, req, [hidden, *extra])
        return out, getattr(msg, "activation_id", None)

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
        if len(grads) != 1 + len(extra):
            raise ServerFailure(
                hop.peer_id, f"backward returned {len(grads)} tensors, expected {1 + len(extra)}"
            )
        return grads

    # --- one chunk ------------------------------------------------------------------------------------

    async def forward_range(
        self, hidden: torch.Tensor, start: int, end: int, tuning: TuningPayload, *, keep: bool = False
    ) -> tuple[torch.Tensor, list[HopTrace]]:
        """Run [start, end) on ``hidden`` [B, T, H]; returns the output and each hop's trace."""
        trace: list[HopTrace] = []
        block, x, failures = start, hidden, 0
        while block < end:
            hops = await self.view.route(block, end, batch_tokens=0, inference=False)
            for hop in hops:
                try:
                    out, activation_id = await self.forward_hop(hop, x, tuning, keep=keep)
                except ServerFailure as e:
                    failures += 1
                    self._on_failure(e, failures)
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
    ) -> torch.Tensor:
        """Gradient w.r.t. the first hop's input; tuning gradients are added into ``tuning_grads``."""
        grad = grad_out
        for step in reversed(trace):
            grad = await self._backward_hop_with_failover(step, grad, tuning, tuning_grads)
        return grad

    async def _backward_hop_with_failover(
        self, step: HopTrace, grad_out: torch.Tensor, tuning: TuningPayload, tuning_grads: list[torch.Tensor]
    ) -> torch.Tensor:
        failures = 0
        try:
            grads = await self.backward_hop(step.hop, step.input, grad_out, tuning, step.activation_id)
            tuning.accumulate(tuning_grads, step.hop, grads[1:])
            return grads[0]
        except ServerFailure as e:
            failures += 1
            self._on_failure(e, failures)
        hop = step.hop
        while True:
            # Replacement servers: re-run the failed range's forward to learn their inputs, then backward.
            try:
                _, sub_trace = await self.forward_range(step.input, hop.start, hop.end, tuning, keep=True)
                partial = [torch.zeros_like(g) for g in tuning_grads]
                grad = grad_out
                for sub in reversed(sub_trace):
                    grads = await self.backward_hop(sub.hop, sub.input, grad, tuning, sub.activation_id)
                    tuning.accumulate(partial, sub.hop, grads[1:])
                    grad = grads[0]
                for full, part in zip(tuning_grads, partial, strict=True):
                    full += part
                return grad
            except ServerFailure as e:
                failures += 1
                self._on_failure(e, failures)

    def _on_failure(self, failure: ServerFailure, failures: int) -> None:
        self.view.ban(failure.peer_id, str(failure))
        if failures > self.view.config.max_retries:
            raise RuntimeError(f"gave up after {failures - 1} retries: {failure}") from failure

    # --- whole batches, chunked and concurrent ----------------------------------------------------------

    async def forward(
        self, hidden: torch.Tensor, tuning: TuningPayload, *, keep: bool = False
    ) -> tuple[torch.Tensor, list[ChunkTrace]]:
        n = self.view.num_blocks
        rows_per_chunk = max(1, MAX_TOKENS_PER_CHUNK // max(1, hidden.shape[1]))
        chunks = [
            slice(i, min(i + rows_per_chunk, hidden.shape[0]))
            for i in range(0, hidden.shape[0], rows_per_chunk)
        ]
        results = await asyncio.gather(
            *(self.forward_range(hidden[rows], 0, n, tuning, keep=keep) for rows in chunks)
        )
        out = torch.cat([r[0] for r in results], dim=0)  # [B, T, H]
        return out, [ChunkTrace(rows, r[1]) for rows, r in zip(chunks, results, strict=True)]

    async def backward(
        self, traces: list[ChunkTrace], grad_out: torch.Tensor, tuning: TuningPayload
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tuning_grads = [torch.zeros_like(t, dtype=torch.float32) for t in tuning.trainable()]
        per_chunk = [[torch.zeros_like(g) for g in tuning_grads] for _ in traces]
        grads_in = await asyncio.gather(
            *(
                self.backward_range(trace.hops, grad_out[trace.rows], tuning, acc)
                for trace, acc in zip(traces, per_chunk, strict=True)
            )
        )
        for acc in per_chunk:
            for full, part in zip(tuning_grads, acc, strict=True):
                full += part
        return torch.cat(list(grads_in), dim=0), tuning_grads


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
        timeout = blocks.view.config.request_timeout * 4
        keep = any(ctx.needs_input_grad)  # a backward will follow: servers keep their graphs for it
        out, traces = loop.run(blocks.forward(hidden.detach(), tuning, keep=keep), timeout=timeout)
        ctx.blocks, ctx.loop, ctx.traces, ctx.tuning, ctx.dtype = blocks, loop, traces, tuning, hidden.dtype
        ctx.leaf_dtypes = [leaf.dtype for leaf in leaves]
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        timeout = ctx.blocks.view.config.request_timeout * 4
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
