"""Forward and backward (training RPCs) in pieces, so other clients' inference steps run between them.

The compute thread runs one closure at a time, highest priority first. A 16k-token forward as one closure made
every other client's decode step wait for all of it (1.5 ms -> 610 ms under a flood). Here each request is cut
into pieces of at most ``chunk_tokens`` rows x tokens, queued one after another at the request's priority: an
inference step (higher priority) queued meanwhile runs after the piece in progress, so it waits at most one piece.

* Rows are independent, so a forward or backward is cut along the batch first (exact).
* A forward without a graph whose single rows are still longer is cut along tokens too, feeding the pieces through
  a temporary KV cache the way chunked prefill does (exact up to float rounding of the attention sums).
* A forward that keeps its graph for backward keeps one graph per row piece over shared leaves (the hidden
  states and the tuning tensors); backward then takes one ``autograd.grad`` per piece and sums them (the rows of
  the other pieces get exact zeros). A single row longer than ``chunk_tokens`` runs as one piece there: its graph
  cannot be cut along tokens (it is bounded by ``max_batch_tokens`` anyway).

:func:`plan_pieces` is the pure part (tested alone).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from potluck.models import BlockSpan, KVCache
from potluck.server.activations import ActivationCache, KeptForward
from potluck.server.runtime import threads_for
from potluck.server.tuning import TuningInputs

Compute = Callable[[int, Callable[[], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` and tokens ``tokens`` of a request, computed by one closure on the compute thread."""

    rows: slice
    tokens: slice

    def size(self) -> int:
        return (self.rows.stop - self.rows.start) * (self.tokens.stop - self.tokens.start)


def plan_pieces(batch: int, tokens: int, chunk_tokens: int, *, split_tokens: bool) -> list[Piece]:
    """Pieces of a ``[batch, tokens]`` request in the order they run: groups of whole rows of at most
    ``chunk_tokens`` rows x tokens, and with ``split_tokens``, single rows cut into runs of ``chunk_tokens``
    tokens (the pieces of one row group run in token order, sharing a cache)."""
    rows_per = max(1, chunk_tokens // max(1, tokens))
    step = chunk_tokens if split_tokens and tokens > chunk_tokens else tokens
    return [
        Piece(slice(r, min(r + rows_per, batch)), slice(t, min(t + step, tokens)))
        for r in range(0, batch, rows_per)
        for t in range(0, tokens, step)
    ]


def _rows_of(tuning: TuningInputs, rows: slice, batch: int) -> TuningInputs:
    """The tuning inputs for ``rows`` of the batch: per-row deep prompts are sliced, shared ones kept."""
    prompts = tuning.prompts
    if prompts is not None and prompts.shape[1] == batch and batch > 1:
        prompts = prompts[:, rows]  # [n_blocks, rows, P, H]
    return TuningInputs(prompts=prompts, lora=tuning.lora, sent_lora=tuning.sent_lora)


@dataclass
class ChunkedCompute:
    """Runs forwards and backwards of one server piece by piece on its compute thread."""

    compute: Compute  # runs a closure on the compute thread at a priority (ServerState.compute)
    chunk_tokens: int  # rows x tokens of one piece (ServerConfig.forward_chunk_tokens)
    device: torch.device
    dtype: torch.dtype
    activations: ActivationCache  # graphs kept for the backward that follows

    async def forward(
        self, priority: int, span: BlockSpan, hidden: torch.Tensor, tuning: TuningInputs, *, keep: bool
    ) -> tuple[torch.Tensor, str | None]:
        """``span`` over ``hidden`` [B, T, H] (CPU, in ``hidden``'s dtype) and, with ``keep``, the kept graph's id."""
        if keep:
            return await self._forward_keep(priority, span, hidden, tuning)
        batch, tokens = hidden.shape[0], hidden.shape[1]
        plan = plan_pieces(batch, tokens, self.chunk_tokens, split_tokens=True)
        outs: list[torch.Tensor] = []  # [rows, t, H] per piece, in plan order
        cache: KVCache | None = None  # temporary cache of the current row group when it is cut along tokens
        for piece in plan:
            whole_rows = piece.tokens.start == 0 and piece.tokens.stop == tokens
            if piece.tokens.start == 0:
                cache = None

            def run(piece: Piece = piece, cache: KVCache | None = cache, whole: bool = whole_rows) -> Any:
                torch.set_num_threads(threads_for(piece.size()))
                with torch.inference_mode():
                    x = hidden[piece.rows, piece.tokens].to(device=self.device, dtype=self.dtype)  # [r, t, H]
                    rows_tuning = _rows_of(tuning, piece.rows, batch)
                    if not whole and cache is None:
                        cache = span.new_cache(x.shape[0], tokens)
                    out = span(
                        x, cache=cache, prompts=rows_tuning.prompts, lora=rows_tuning.lora
                    )  # [r, t, H]
                    return out.to(device="cpu", dtype=hidden.dtype), cache

            out, cache = await self.compute(priority, run)
            outs.append(out)
        return _assemble(outs, plan), None

    async def _forward_keep(
        self, priority: int, span: BlockSpan, hidden: torch.Tensor, tuning: TuningInputs
    ) -> tuple[torch.Tensor, str | None]:
        batch, tokens = hidden.shape[0], hidden.shape[1]

        def leaves_of() -> tuple[torch.Tensor, TuningInputs]:
            x = hidden.to(device=self.device, dtype=self.dtype).requires_grad_(True)  # [B, T, H]
            return x, tuning.requires_grad_()

        x, graph_tuning = await self.compute(priority, leaves_of)
        leaves = [x, *graph_tuning.leaves()]
        parts: list[KeptForward] = []
        for piece in plan_pieces(batch, tokens, self.chunk_tokens, split_tokens=False):

            def run(piece: Piece = piece) -> KeptForward:
                torch.set_num_threads(threads_for(piece.size()))
                out = _graph_forward(span, x, graph_tuning, piece.rows)
                return KeptForward(out, leaves, span.start, span.end, time.monotonic(), rows=piece.rows)

            parts.append(await self.compute(priority, run))
        out = torch.cat([p.output.detach() for p in parts], dim=0).to(device="cpu", dtype=hidden.dtype)
        # the cache is only touched on the compute thread (it also expires entries there)
        return out, await self.compute(priority, lambda: self.activations.put_parts(parts))

    async def backward(
        self,
        priority: int,
        span: BlockSpan,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        tuning: TuningInputs,
        activation_id: str | None,
    ) -> list[torch.Tensor]:
        """[grad of ``hidden``, *grads of the tuning leaves] (CPU, ``hidden``'s dtype), piece by piece: from the
        kept graphs of the forward when they match, else recomputing each piece's forward with autograd."""
        kept = await self.compute(
            priority, lambda: self.activations.pop_parts(activation_id, span.start, span.end)
        )
        num_leaves = 1 + len(tuning.leaves())
        if kept is not None and not _matches(kept, grad_out, num_leaves):
            kept = None
        batch, tokens = hidden.shape[0], hidden.shape[1]
        totals: list[torch.Tensor | None] = [None] * num_leaves
        # per piece: its rows, and how to get their output attached to the graph over ``leaves``
        steps: list[tuple[slice, Callable[[], torch.Tensor]]] = []
        if kept is not None:
            leaves = kept[0].leaves
            steps = [(_rows(p), functools.partial(_kept_output, p)) for p in kept]
        else:  # nothing kept (or evicted, or another server did the forward): recompute each piece with autograd

            def leaves_of() -> tuple[torch.Tensor, TuningInputs]:
                x = hidden.to(device=self.device, dtype=self.dtype).requires_grad_(True)  # [B, T, H]
                return x, tuning.requires_grad_()

            x, graph_tuning = await self.compute(priority, leaves_of)
            leaves = [x, *graph_tuning.leaves()]
            for p in plan_pieces(batch, tokens, self.chunk_tokens, split_tokens=False):
                steps.append((p.rows, functools.partial(_graph_forward, span, x, graph_tuning, p.rows)))
        for rows, forward in steps:

            def run(rows: slice = rows, forward: Callable[[], torch.Tensor] = forward) -> None:
                torch.set_num_threads(threads_for((rows.stop - rows.start) * tokens))
                out = forward()  # [rows, T, H] attached to the graph over ``leaves``
                grads = torch.autograd.grad(
                    out, leaves, grad_out[rows].to(out.device, out.dtype), allow_unused=True
                )
                for i, g in enumerate(grads):
                    if g is not None:
                        totals[i] = g if totals[i] is None else totals[i] + g  # type: ignore[operator]

            await self.compute(priority, run)
        return [
            (torch.zeros_like(leaf) if g is None else g).to(device="cpu", dtype=hidden.dtype)
            for g, leaf in zip(totals, leaves, strict=True)
        ]


def _graph_forward(span: BlockSpan, x: torch.Tensor, tuning: TuningInputs, rows: slice) -> torch.Tensor:
    """On the compute thread: ``span`` over rows ``rows`` of ``x`` [B, T, H], with autograd reaching the leaves
    ``x`` and the tuning tensors (sliced inside the graph, so their gradients come back whole)."""
    with torch.enable_grad():
        piece = _rows_of(tuning, rows, x.shape[0])
        return span(x[rows], prompts=piece.prompts, lora=piece.lora)  # type: ignore[no-any-return]


def _kept_output(part: KeptForward) -> torch.Tensor:
    return part.output


def _rows(part: KeptForward) -> slice:
    return part.rows if part.rows is not None else slice(0, part.output.shape[0])


def _matches(kept: list[KeptForward], grad_out: torch.Tensor, num_leaves: int) -> bool:
    """Whether kept graphs fit this backward: same rows in total, same shape, same number of leaves."""
    rows = sum(p.output.shape[0] for p in kept)
    first = kept[0]
    return (
        rows == grad_out.shape[0]
        and first.output.shape[1:] == grad_out.shape[1:]
        and len(first.leaves) == num_leaves
    )


def _assemble(outs: list[torch.Tensor], pieces: list[Piece]) -> torch.Tensor:
    """The pieces' outputs [r, t, H] back into one [B, T, H]: tokens joined within a row group, then rows."""
    groups: list[list[torch.Tensor]] = []
    for out, piece in zip(outs, pieces, strict=True):
        if piece.tokens.start == 0:
            groups.append([])
        groups[-1].append(out)
    return torch.cat([torch.cat(g, dim=1) if len(g) > 1 else g[0] for g in groups], dim=0)
