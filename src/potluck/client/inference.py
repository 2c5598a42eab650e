"""Inference sessions over a chain of servers, surviving servers that vanish mid-generation.

The client keeps, for every hop of the chain, the hidden states it sent from position 0 (``InputHistory``).
When a hop fails (lost connection, error reply, step timeout, draining), the client bans that server,
routes a replacement chain for the failed blocks only (its boundaries may differ), and sends the new
servers the history from position 0 together with the current step, so they rebuild their KV caches in
the same round trip. Downstream hops that were already in sync get only the new tokens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from potluck.client.swarm_view import SwarmView
from potluck.client.tuning import TuningPayload
from potluck.server.handlers import PROTOCOL_INFERENCE
from potluck.swarm.routing import RouteHop, format_route
from potluck.wire import (
    CloseInference,
    ErrorReply,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    OpenInference,
    ProtocolError,
    StreamClosed,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)


class ServerFailure(Exception):
    """One server could not serve a request; another server may."""

    def __init__(self, peer_id: str, message: str):
        super().__init__(message)
        self.peer_id = peer_id


class InferenceFailedError(RuntimeError):
    """A step could not be completed within the retry budget."""


class InputHistory:
    """Hidden states sent to one hop, by position: appended per step, truncated on rollback."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []  # each [B, t, H], contiguous in position from 0
        self.length = 0

    def put(self, x: torch.Tensor, position: int) -> None:
        """Record ``x`` [B, T, H] as positions ``position..position+T-1`` (dropping anything after)."""
        self.truncate(position)
        self._chunks.append(x)
        self.length += x.shape[1]

    def truncate(self, position: int) -> None:
        if position >= self.length:
            if position > self.length:
                raise ValueError(f"history holds {self.length} tokens, cannot extend to {position}")
            return
        kept, total = [], 0
        for chunk in self._chunks:
            if total + chunk.shape[1] <= position:
                kept.append(chunk)
                total += chunk.shape[1]
            else:
                if position > total:
                    kept.append(chunk[:, : position - total])
                    total = position
                break
        self._chunks, self.length = kept, total

    def get(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) as one tensor [B, end-start, H]."""
        parts, offset = [], 0
        for chunk in self._chunks:
            lo, hi = max(start, offset), min(end, offset + chunk.shape[1])
            if lo < hi:
                parts.append(chunk[:, lo - offset : hi - offset])
            offset += chunk.shape[1]
        return torch.cat(parts, dim=1)

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        self._chunks = [c[hypo_ids] for c in self._chunks]

    def copy(self) -> InputHistory:
        other = InputHistory()
        other._chunks, other.length = list(self._chunks), self.length
        return other


@dataclass
class HopSession:
    """An open inference stream to one server for blocks [start, end)."""

    hop: RouteHop
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    history: InputHistory = field(default_factory=InputHistory)
    server_length: int = 0  # tokens the server's cache holds
    step_id: int = 0
    closed: bool = False
    pending_hypo: list[int] | None = None  # beam search: row reorder to send with the next step

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(write_message(self.writer, CloseInference()), timeout=1)
        with contextlib.suppress(Exception):
            self.writer.close()


class RemoteInferenceSession:
    """One generation's sessions across the chain; ``step`` maps hidden states [B, T, H] through all blocks."""

    def __init__(
        self, view: SwarmView, *, max_length: int, batch_size: int, tuning: TuningPayload | None = None
    ):
        self.view = view
        self.tuning = tuning or TuningPayload()  # prompts / adapters, sent to each server once at open
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0  # tokens processed so far
        self.pads: list[int] | None = None  # left padding per row, sent with every step (None: no padding)
        self.hops: list[HopSession] = []
        self.failovers = 0  # servers replaced during this session, for logs and benchmarks
        self.last_failover_at: float | None = None
        # (peer, seconds from send to reply, seconds the server reported): per-hop overhead for benchmarks
        self.hop_times: collections.deque[tuple[str, float, float]] = collections.deque(maxlen=4096)
        self._closed = False

    # --- opening ---------------------------------------------------------------------------------------

    async def _open_hop(self, hop: RouteHop) -> HopSession:
        cfg = self.view.config
        t0 = time.perf_counter()
        try:
            reader, writer = await self.view.open_stream(
                hop.peer_id, PROTOCOL_INFERENCE, timeout=cfg.connect_timeout
            )
            tuning, tuning_tensors = self.tuning.for_hop(hop)
            await asyncio.wait_for(
                write_message(
                    writer,
                    OpenInference(
                        model=self.view.model_prefix,
                        start=hop.start,
                        end=hop.end,
                        max_length=self.max_length,
                        batch_size=self.batch_size,
                        alloc_timeout=cfg.alloc_timeout,
                        output_compression=cfg.compression,  # type: ignore[arg-type]
                        tuning=tuning,
                    ),
                    tuning_tensors,
                ),
                timeout=cfg.connect_timeout,
            )
            msg, _ = await read_message(reader, timeout=cfg.connect_timeout + cfg.alloc_timeout)
        except (TimeoutError, OSError, ProtocolError, StreamClosed, asyncio.IncompleteReadError) as e:
            raise ServerFailure(hop.peer_id, f"could not open a session: {type(e).__name__}: {e}") from e
        except Exception as e:  # p2pd reports unreachable peers with its own exception types
            raise ServerFailure(hop.peer_id, f"could not open a session: {type(e).__name__}: {e}") from e
        if isinstance(msg, ErrorReply):
            raise ServerFailure(hop.peer_id, f"refused the session: {msg.code}: {msg.message}")
        if not isinstance(msg, InferenceOpened):
            raise ServerFailure(hop.peer_id, f"unexpected reply {getattr(msg, 'kind', msg)!r}")
        self.view.record_rtt(hop.peer_id, time.perf_counter() - t0)
        return HopSession(hop=hop, reader=reader, writer=writer)

    async def _open_chain(self, start: int, end: int) -> list[HopSession]:
        """Route and open sessions for [start, end); servers that fail to open are banned and re-routed."""
        cfg = self.view.config
        for _attempt in range(cfg.max_retries + 1):
            hops = await self.view.route(
                start, end, batch_tokens=self.batch_size * self.max_length, inference=True
            )
            opened: list[HopSession] = []
            try:
                for hop in hops:
                    opened.append(await self._open_hop(hop))
                return opened
            except ServerFailure as e:
                self.view.ban(e.peer_id, str(e))
                for s in opened:
                    await s.close()
                with contextlib.suppress(Exception):
                    await self.view.refresh(min_age=1.0)
        raise InferenceFailedError(
            f"could not open sessions for blocks {start}:{end} after {cfg.max_retries} retries"
        )

    async def open(self) -> None:
        self.hops = await self._open_chain(0, self.view.num_blocks)
        logger.info("inference session over %s", format_route([h.hop for h in self.hops]))

    # --- steps -----------------------------------------------------------------------------------------

    async def step(
        self, inputs: torch.Tensor, *, position: int | None = None, hypo_ids: list[int] | None = None
    ) -> torch.Tensor:
        """Run ``inputs`` [B, T, H] (tokens at ``position``, default: the end) through every block.

        ``hypo_ids`` (beam search) reorders the rows of every server's cache (and of our histories) first.
        """
        if self._closed:
            raise RuntimeError("this inference session is closed")
        if hypo_ids is not None:
            self._reorder(hypo_ids)
        position = self.position if position is None else position
        num_new = inputs.shape[1]
        if position > self.position:
            raise ValueError(f"step at position {position} but only {self.position} tokens were processed")
        if position + num_new > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({position + num_new} tokens)")
        x, x_start = inputs, position  # x holds positions [x_start, position + num_new) at the current block
        index = 0
        failures = 0
        while index < len(self.hops):
            hop = self.hops[index]
            send_start = min(
                hop.server_length, position
            )  # a new server starts from 0, a synced one at position
            if x_start > send_start:  # prepend history this server lacks (replay after a failover)
                x_send = torch.cat([hop.history.get(send_start, x_start), x], dim=1)
            else:
                x_send = x[:, send_start - x_start :]
            try:
                out = await self._send(hop, x_send, send_start)
            except ServerFailure as e:
                failures += 1
                await self._replace(index, e, failures)
                continue
            hop.history.put(x_send, send_start)
            hop.server_length = send_start + x_send.shape[1]
            x, x_start = out, send_start
            index += 1
        self.position = position + num_new
        return x[:, position - x_start :]

    def _reorder(self, hypo_ids: list[int]) -> None:
        index = torch.tensor(hypo_ids, dtype=torch.long)
        for hop in self.hops:
            hop.history.reorder(index)
            hop.pending_hypo = hypo_ids  # a replacement server replays the reordered history instead
        if self.pads is not None:
            self.pads = [self.pads[i] for i in hypo_ids]

    async def _send(self, hop: HopSession, x: torch.Tensor, position: int) -> torch.Tensor:
        """One or more step messages to ``hop`` (long replays are split); returns outputs for all of ``x``."""
        cfg = self.view.config
        limit = max(1, cfg.max_replay_tokens // max(1, x.shape[0]))
        outs = []
        for offset in range(0, x.shape[1], limit):
            piece = x[:, offset : offset + limit]
            hop.step_id += 1
            if cfg.emulated_hop_delay:
                await asyncio.sleep(cfg.emulated_hop_delay)  # emulated one-way WAN latency (benchmarks)
            sent_at = time.perf_counter()
            try:
                # One deadline for the whole round trip (and no extra task per step, unlike wait_for).
                async with asyncio.timeout(cfg.step_timeout):
                    step = InferenceStep(
                        step_id=hop.step_id,
                        position=position + offset,
                        pads=self.pads,
                        hypo_ids=hop.pending_hypo if offset == 0 else None,
                    )
                    await write_message(hop.writer, step, [piece], cfg.compression)
                    msg, tensors = await read_message(hop.reader)
            except TimeoutError:
                raise ServerFailure(
                    hop.peer_id, f"no reply within the step timeout ({cfg.step_timeout}s)"
                ) from None
            except (StreamClosed, ProtocolError, OSError, asyncio.IncompleteReadError) as e:
                raise ServerFailure(hop.peer_id, f"connection lost: {type(e).__name__}: {e}") from e
            if cfg.emulated_hop_delay:
                await asyncio.sleep(cfg.emulated_hop_delay)
            if isinstance(msg, ErrorReply):
                raise ServerFailure(hop.peer_id, f"{msg.code}: {msg.message}")
            if (
                not isinstance(msg, InferenceStepResult)
                or len(tensors) != 1
                or tensors[0].shape != piece.shape
            ):
                raise ServerFailure(hop.peer_id, "malformed step reply")
            outs.append(tensors[0])
            self.hop_times.append((hop.peer_id, time.perf_counter() - sent_at, msg.server_ms / 1000))
        hop.pending_hypo = None
        self.view.clear_ban(hop.peer_id)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    async def _replace(self, index: int, failure: ServerFailure, failures: int) -> None:
        """Swap hop ``index`` for a fresh chain over the same blocks; its history goes to the first new hop."""
        cfg = self.view.config
        failed = self.hops[index]
        t0 = time.perf_counter()
        self.view.ban(failed.peer_id, str(failure))
        await failed.close()
        if failures > cfg.max_retries:
            raise InferenceFailedError(
                f"blocks {failed.hop.start}:{failed.hop.end}: gave up after {cfg.max_retries} failovers "
                f"(last: server {failed.peer_id[-8:]}: {failure})"
            )
        with contextlib.suppress(Exception):
            await self.view.refresh(min_age=1.0)
        replacement = await self._open_chain(
            failed.hop.start, failed.hop.end
        )  # MissingBlocksError propagates
        replacement[0].history = failed.history.copy()
        self.hops[index : index + 1] = replacement
        self.failovers += 1
        self.last_failover_at = time.perf_counter()
        logger.warning(
            "server %s failed on blocks %d:%d (%s); replaced by %s in %.2fs, replaying %d tokens",
            failed.peer_id[-8:], failed.hop.start, failed.hop.end, failure,
            format_route([h.hop for h in replacement]), time.perf_counter() - t0, failed.history.length,
        )  # fmt: skip

    async def close(self) -> None:
        self._closed = True
        for hop in self.hops:
            await hop.close()
        self.hops = []
