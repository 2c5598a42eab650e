"""Inference sessions over a chain of servers, surviving servers that vanish mid-generation.

The client keeps, for every hop of the chain, the hidden states it sent from position 0 (``InputHistory``).
When a hop fails (lost connection, error reply, step timeout, draining), the client bans that server,
routes a replacement chain for the failed blocks only (its boundaries may differ), and sends the new
servers the history from position 0 together with the current step, so they rebuild their KV caches in
the same round trip. Downstream hops that were already in sync get only the new tokens.
What counts as a failure, and what is fatal instead, is decided in ``failures.py`` (shared with training).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from potluck.client.failures import (
    CONNECTION_ERRORS,
    Failover,
    HopFailure,
    Verdict,
    call_deadline,
    failure_from_exception,
    failure_from_reply,
    unexpected_reply,
)
from potluck.client.push import push_fits, pushed_step, read_step_reply
from potluck.client.swarm_view import SwarmView
from potluck.client.tuning import TuningPayload
from potluck.client.verification import Verifier
from potluck.swarm.routing import RouteHop, RouteRequirements, format_route
from potluck.wire import (
    PROTOCOL_INFERENCE,
    CloseInference,
    ErrorReply,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    OpenInference,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)


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
    session_id: str = ""  # the server's id of this session (the previous server pushes into it)
    # push (client/push.py): this server could not push to the next one, so that link is relayed from now on
    push_off: bool = False
    push_token: str | None = None  # secret the previous server presents when pushing into this session
    # ``uid`` of the previous hop this server was told to accept pushes from
    push_accept_key: int | None = None
    push_next_key: int | None = None  # ``uid`` of the next hop this server was told to push to
    uid: int = field(default_factory=itertools.count().__next__)  # unique per HopSession (ids get reused)

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await write_message(self.writer, CloseInference())
        with contextlib.suppress(Exception):
            self.writer.close()


class RemoteInferenceSession:
    """One generation's sessions across the chain; ``step`` maps hidden states [B, T, H] through all blocks."""

    def __init__(
        self,
        view: SwarmView,
        *,
        max_length: int,
        batch_size: int,
        tuning: TuningPayload | None = None,
        fingerprint: str | None = None,
    ):
        self.view = view
        self.tuning = tuning or TuningPayload()  # prompts / adapters, sent to each server once at open
        self.max_length = max_length
        self.batch_size = batch_size
        # What every server of the chain must offer: routing leaves out the others (without banning them).
        self.needs = RouteRequirements(
            adapter=self.tuning.active_adapter,
            max_length=max_length,
            # steps go in pieces of at most max_replay_tokens batch*tokens (at least one token per row)
            batch_tokens=min(batch_size * max_length, max(view.config.max_replay_tokens, batch_size)),
            fingerprint=fingerprint,
        )
        self.position = 0  # tokens processed so far
        self.pads: list[int] | None = None  # left padding per row, sent with every step (None: no padding)
        self.hops: list[HopSession] = []
        self.failovers = 0  # servers replaced during this session, for logs and benchmarks
        # steps sent with server-to-server push (client/push.py), for tests and benchmarks
        self.pushed_steps = 0
        self.last_failover_at: float | None = None
        # (peer, seconds from send to reply, seconds the server reported): per-hop overhead for benchmarks
        self.hop_times: collections.deque[tuple[str, float, float]] = collections.deque(maxlen=4096)
        self._closed = False
        # [trust] spot checks of servers' outputs on other servers (client/verification.py); None when off
        cfg = view.config
        self.verifier = (
            Verifier(view, cfg.verify_fraction, seed=cfg.verify_seed) if cfg.verify_fraction > 0 else None
        )

    # --- opening ---------------------------------------------------------------------------------------

    async def _open_hop(self, hop: RouteHop) -> HopSession:
        cfg = self.view.config
        t0 = time.perf_counter()
        try:
            reader, writer = await self.view.open_stream(
                hop.peer_id, PROTOCOL_INFERENCE, timeout=cfg.connect_timeout
            )
        except CONNECTION_ERRORS as e:
            raise failure_from_exception(hop.peer_id, e, "opening a session") from e
        tuning, tuning_tensors = self.tuning.for_hop(hop)
        try:
            async with asyncio.timeout(cfg.connect_timeout + cfg.alloc_timeout):
                await write_message(
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
                )
                msg, _ = await read_message(reader)
        except CONNECTION_ERRORS as e:
            writer.close()
            raise failure_from_exception(hop.peer_id, e, "opening a session") from e
        if isinstance(msg, ErrorReply):
            writer.close()
            raise failure_from_reply(hop.peer_id, msg)
        if not isinstance(msg, InferenceOpened):
            writer.close()
            raise unexpected_reply(hop.peer_id, "open_inference")
        self.view.record_rtt(hop.peer_id, time.perf_counter() - t0)
        return HopSession(hop=hop, reader=reader, writer=writer, session_id=msg.session_id)

    async def _open_chain(self, start: int, end: int, failover: Failover) -> list[HopSession]:
        """Route and open sessions for [start, end); failures go through the call's ``failover`` policy."""
        while True:
            hops = await failover.route(
                start, end, inference=True, batch_tokens=self.batch_size * self.max_length
            )
            opened: list[HopSession] = []
            try:
                for hop in hops:
                    opened.append(await self._open_hop(hop))
                return opened
            except HopFailure as e:
                for s in opened:
                    await s.close()
                await failover.handle(e)

    async def open(self) -> None:
        what = f"opening an inference session over blocks 0:{self.view.num_blocks}"
        async with call_deadline(self.view.config.request_timeout, what):
            self.hops = await self._open_chain(0, self.view.num_blocks, Failover(self.view, self.needs, what))
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
        what = f"inference step at position {position}"
        async with call_deadline(self.view.config.request_timeout, what):
            return await self._step(inputs, position, Failover(self.view, self.needs, what))

    async def _step(self, inputs: torch.Tensor, position: int, failover: Failover) -> torch.Tensor:
        num_new = inputs.shape[1]
        x, x_start = inputs, position  # x holds positions [x_start, position + num_new) at the current block
        index = 0
        if push_fits(self, inputs, position):  # servers pass outputs on themselves (client/push.py)
            index, x, failure = await pushed_step(self, inputs, position)
            if failure is not None:  # then relay from the failed hop on, exactly as below
                await self._replace(index, failure, failover)
            self.pushed_steps += 1
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
            except HopFailure as e:
                await self._replace(index, e, failover)
                continue
            if self.verifier is not None:  # [trust] may replace a caught liar and raise VerificationRollback
                await self.verifier.after_step(self, index, x_send, send_start, out)
            hop.history.put(x_send, send_start)
            hop.server_length = send_start + x_send.shape[1]
            x, x_start = out, send_start
            index += 1
        self.position = position + num_new
        return x[:, position - x_start :]

    def rollback(self, position: int) -> None:
        """Forget positions >= ``position`` (rejected draft tokens): no message is sent; the next step starts
        there and the servers drop the rest of their caches then. The per-hop histories are cut too, so a
        failover replays only the positions kept."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        self.position = position
        for hop in self.hops:
            hop.history.truncate(min(position, hop.history.length))
            hop.server_length = min(hop.server_length, position)

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
            sent_at = time.perf_counter()
            try:
                # One deadline for the whole round trip (and no extra task per step, unlike wait_for).
                async with asyncio.timeout(cfg.step_timeout):
                    step = InferenceStep(
                        step_id=hop.step_id,
                        position=position + offset,
                        pads=self.pads,
                        hypo_ids=hop.pending_hypo if offset == 0 else None,
                        chain_start=hop is self.hops[0],
                    )
                    await write_message(hop.writer, step, [piece], cfg.compression)
                    msg, tensors = await read_step_reply(hop)
            except CONNECTION_ERRORS as e:
                raise failure_from_exception(
                    hop.peer_id, e, f"step (step_timeout {cfg.step_timeout}s)"
                ) from e
            if isinstance(msg, ErrorReply):
                raise failure_from_reply(hop.peer_id, msg)
            if (
                not isinstance(msg, InferenceStepResult)
                or len(tensors) != 1
                or tensors[0].shape != piece.shape
            ):
                raise unexpected_reply(hop.peer_id, "inference_step")
            outs.append(tensors[0])
            self.hop_times.append((hop.peer_id, time.perf_counter() - sent_at, msg.server_ms / 1000))
        hop.pending_hypo = None
        self.view.clear_ban(hop.peer_id)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    async def _replace(self, index: int, failure: HopFailure, failover: Failover) -> None:
        """Swap hop ``index`` for a fresh chain over the same blocks; its history goes to the first new hop.

        ``failover.handle`` first: a fatal failure is raised from there (the session stays as it was, nobody is
        banned); a retryable one bans the server and counts against ``max_retries``.
        """
        failed = self.hops[index]
        t0 = time.perf_counter()
        await failover.handle(failure)
        await failed.close()
        replacement = await self._open_chain(failed.hop.start, failed.hop.end, failover)
        replacement[0].history = failed.history.copy()
        self.hops[index : index + 1] = replacement
        self.failovers += 1
        self.last_failover_at = time.perf_counter()
        logger.warning(
            "server %s failed on blocks %d:%d (%s); replaced by %s in %.2fs, replaying %d tokens",
            failed.peer_id[-8:], failed.hop.start, failed.hop.end, failure,
            format_route([h.hop for h in replacement]), time.perf_counter() - t0, failed.history.length,
        )  # fmt: skip

    async def replace_liar(self, index: int, liar: str, position: int) -> None:
        """[trust] Hop ``index`` was caught lying: replace it and roll the session back to ``position``, the last
        position its outputs were verified at; the replacement replays the history before it."""
        self.hops[index].history.truncate(position)
        failure = HopFailure(liar, Verdict.retry_elsewhere, "caught returning wrong outputs")
        await self._replace(index, failure, Failover(self.view, self.needs, "replacing a lying server"))
        self.position = position

    async def close(self) -> None:
        self._closed = True
        for hop in self.hops:
            await hop.close()
        self.hops = []
