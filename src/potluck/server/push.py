"""Server-to-server push: a step's output goes straight to the next server of the chain (see ``wire/push.py``).

Relaying, a step through k servers crosses 2k one-way links (client -> s1 -> client -> s2 ...); pushing, it crosses
k + 1 (client -> s1 -> s2 -> ... -> sk -> client). Each server still sends the client a copy of its output (after
the push, so off the critical path): the client keeps every hop's input history for failover, and a push that
fails (next server dead, unreachable, refusing) is reported in that reply (``push_error``), so the client sends
the output on itself and the step goes on under the client's one failure policy.

Per session, ``SessionPush`` holds what the client configured (``PushConfig``): where to push and whom to accept
pushes from. The outgoing push stream is opened as soon as the config arrives (off the step path), through the
next server's direct path when it announces one, else libp2p (the same authenticated machinery clients use),
and starts with ``PushHello`` carrying the client's token for that link. The receiver checks the session, the
pushing peer's id and the token (constant time) before accepting; steps pushed on an accepted stream are then run
exactly like the client's own steps of that session (one at a time) and answered to the client's stream.

Servers also measure RTTs to the servers after their span (the push handshake and a cheap info ping) and
announce the best few in their records (``next_pings``), which the client's router uses for server-to-server legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from potluck.server.sessions import Session
from potluck.swarm.direct import open_direct_first
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.records import SwarmSnapshot
from potluck.swarm.transport import SwarmNode
from potluck.wire import (
    PROTOCOL_INFO,
    PROTOCOL_PUSH,
    CloseInference,
    ErrorReply,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    OpenInference,
    ProtocolError,
    PushAccepted,
    PushConfig,
    PushHello,
    PushTarget,
    StreamClosed,
    WireLimits,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # opening a push stream and its handshake; past it the push fails (the client relays)
HELLO_WAIT = 5.0  # a hello may overtake the client's config of this session: wait this long for it
PUSH_SEND_TIMEOUT = 10.0  # a next server that does not take a pushed step this fast has failed the push
DIRECTORY_MAX_AGE = 30.0  # re-read the swarm's records (for direct addresses) when older than this
ANNOUNCED_RTTS = 16  # RTTs to this many peers (the lowest) go into the record's ``next_pings``
PROBES_PER_ROUND = 4  # info pings per announce period
RTT_SMOOTHING = 0.3  # weight of a new RTT sample in the moving average

# (entry, step, hidden) -> runs the step in the entry's session and answers the client (handlers.py)
StepRunner = Callable[["SessionPush", InferenceStep, torch.Tensor], Awaitable[None]]


@dataclass
class SessionPush:
    """Push state of one open inference session on this server."""

    session: Session
    opened: OpenInference
    client_writer: asyncio.StreamWriter  # the client's inference stream: answers to pushed steps go there too
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one frame at a time on client_writer
    step_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, pushed or not
    next: PushTarget | None = None
    accept_from: str | None = None
    accept_token: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on every new config
    link: asyncio.Task[asyncio.StreamWriter] | None = None  # opening / opened push stream to ``next``
    last_step_at: float = field(
        default_factory=time.monotonic
    )  # pushed steps keep an idle client stream open
    inbound: int = 0  # accepted push streams into this session (at most one at a time)


class PeerRtts:
    """Measured RTTs (seconds, smoothed) from this server to other servers."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._rtts: dict[str, float] = {}

    def record(self, peer_id: str, seconds: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        old = self._rtts.pop(peer_id, None)
        self._rtts[peer_id] = seconds if old is None else (1 - RTT_SMOOTHING) * old + RTT_SMOOTHING * seconds
        while len(self._rtts) > self.limit:  # forget the least recently measured
            del self._rtts[next(iter(self._rtts))]

    def get(self, peer_id: str) -> float | None:
        return self._rtts.get(peer_id)

    def best(self, n: int = ANNOUNCED_RTTS) -> dict[str, float]:
        """The ``n`` lowest RTTs, rounded to 0.1 ms (what the record announces)."""
        return {p: round(r, 4) for p, r in sorted(self._rtts.items(), key=lambda kv: (kv[1], kv[0]))[:n]}


class PushHub:
    """Every session's push state on this server, the push stream handler and the RTT measurements."""

    def __init__(
        self,
        node: SwarmNode,
        *,
        model_prefix: str,
        num_blocks: int,
        limits: WireLimits,
        step_timeout: float,
        enabled: bool = True,
    ):
        self.node = node
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.limits = limits
        self.step_timeout = step_timeout
        self.enabled = enabled  # False (`serve --no-push`): never push, refuse pushes; clients relay
        self.entries: dict[str, SessionPush] = {}
        self.rtts = PeerRtts()
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_at = -math.inf
        self._snapshot_lock = asyncio.Lock()
        self._rng = random.Random()

    # --- sessions -----------------------------------------------------------------------------------

    def register(self, session: Session, opened: OpenInference, writer: asyncio.StreamWriter) -> SessionPush:
        entry = SessionPush(session=session, opened=opened, client_writer=writer)
        self.entries[session.id] = entry
        return entry

    def unregister(self, entry: SessionPush) -> None:
        self.entries.pop(entry.session.id, None)
        self._drop_link(entry)
        entry.accept_from = entry.accept_token = None
        entry.changed.set()

    def configure(self, entry: SessionPush, config: PushConfig) -> None:
        """Apply the client's ``PushConfig``: open the new outgoing link now, so the first push finds it ready."""
        if not self.enabled:
            return  # steps with push=True are answered with push_error; the client relays
        if config.next != entry.next:
            self._drop_link(entry)
            entry.next = config.next
            if config.next is not None:
                entry.link = asyncio.ensure_future(self._open_link(entry.session.id, config.next))
                entry.link.add_done_callback(_retrieve)
        entry.accept_from, entry.accept_token = config.accept_from, config.accept_token
        entry.changed.set()
        entry.changed = asyncio.Event()

    def _drop_link(self, entry: SessionPush) -> None:
        link, entry.link, entry.next = entry.link, None, None
        if link is None:
            return
        if link.done() and not link.cancelled() and link.exception() is None:
            writer = link.result()
            asyncio.ensure_future(_close_link(writer))
        else:
            link.cancel()

    # --- pushing ------------------------------------------------------------------------------------

    async def push(self, entry: SessionPush, step: InferenceStep, out: torch.Tensor) -> str | None:
        """Send ``out`` as the next server's step; returns why it failed (None: sent)."""
        if not self.enabled:
            return "push is turned off on this server"
        if entry.next is None or entry.link is None:
            return "no next server configured for push"
        link = entry.link
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT + PUSH_SEND_TIMEOUT):
                writer = await asyncio.shield(link)
                forwarded = InferenceStep(
                    step_id=step.step_id,
                    position=step.position,
                    hypo_ids=step.hypo_ids,
                    pads=step.pads,
                    push=True,
                )
                await write_message(writer, forwarded, [out], entry.opened.output_compression)
        except asyncio.CancelledError:
            if not link.cancelled():
                raise
            return "push link was replaced"
        except Exception as e:  # dead, unreachable or refusing next server: the client relays instead
            next_peer = entry.next.peer_id[-8:] if entry.next is not None else "?"
            logger.info("push of session %s to %s failed: %s", entry.session.id[:8], next_peer, e)
            self._drop_link(entry)  # later steps report at once; the client stops asking for push
            return f"{type(e).__name__}: {e}"[:400]
        return None

    async def _open_link(self, session_id: str, target: PushTarget) -> asyncio.StreamWriter:
        """Open the push stream to ``target`` and pass its handshake; measures the RTT on the way."""
        reader, writer = await self.open_stream(target.peer_id, PROTOCOL_PUSH)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                t0 = time.perf_counter()
                await write_message(writer, PushHello(session_id=target.session_id, token=target.token))
                msg, _ = await read_message(reader, self.limits)
                rtt = time.perf_counter() - t0
        except BaseException:
            writer.close()
            raise
        if isinstance(msg, ErrorReply):
            writer.close()
            raise ConnectionRefusedError(f"next server refused the push: {msg.code}: {msg.message}")
        if not isinstance(msg, PushAccepted):
            writer.close()
            raise ConnectionRefusedError("next server answered the push hello with something else")
        self.rtts.record(target.peer_id, rtt)
        logger.debug("push link for session %s to %s open (rtt %.1f ms)", session_id[:8], target.peer_id[-8:],
                     rtt * 1000)  # fmt: skip
        return writer

    async def open_stream(
        self, peer_id: str, protocol: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to another server: its direct path when its record announces one, else libp2p."""
        snapshot = await self._directory(peer_id)
        span = snapshot.servers.get(peer_id) if snapshot is not None else None  # type: ignore[call-overload]
        addrs = span.record.direct_addrs if span is not None else ()
        return await open_direct_first(
            self.node, peer_id, protocol, addrs, timeout=CONNECT_TIMEOUT, direct_timeout=CONNECT_TIMEOUT
        )

    async def _directory(self, peer_id: str | None = None) -> SwarmSnapshot | None:
        """The swarm's records (cached); re-read when old, or when ``peer_id`` is not in them (rate-limited)."""
        async with self._snapshot_lock:
            now = time.monotonic()
            stale = now - self._snapshot_at > DIRECTORY_MAX_AGE
            missing = (
                peer_id is not None
                and self._snapshot is not None
                and peer_id not in self._snapshot.servers
                and now - self._snapshot_at > 1.0
            )
            if stale or missing:
                try:
                    self._snapshot = await fetch_snapshot(
                        self.node, self.model_prefix, self.num_blocks, timeout=CONNECT_TIMEOUT
                    )
                except Exception as e:  # the DHT being slow must not stop a push: libp2p needs no address
                    logger.debug("reading the swarm's records for push failed: %s", e)
                self._snapshot_at = now
            return self._snapshot

    # --- receiving ----------------------------------------------------------------------------------

    async def handle(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, run_step: StepRunner
    ) -> None:
        """The ``PROTOCOL_PUSH`` handler: check the hello, then run every pushed step in its session."""
        try:
            msg, _ = await read_message(reader, self.limits, timeout=CONNECT_TIMEOUT)
        except Exception as e:
            logger.debug("push stream from %s: no valid hello: %s", peer[-8:], e)
            return
        if not isinstance(msg, PushHello):
            await _refuse(writer, "a push stream must start with push_hello")
            return
        entry = await self._accepting(peer, msg)
        if entry is None:
            logger.info("push from %s into session %s refused", peer[-8:], msg.session_id[:8])
            await _refuse(writer, "push refused: no such session, or not named by its client")
            return
        entry.inbound += 1
        try:
            await write_message(writer, PushAccepted())
            await self._pushed_steps(entry, reader, run_step)
        finally:
            entry.inbound -= 1

    async def _accepting(self, peer: str, hello: PushHello) -> SessionPush | None:
        """The session this hello may push into (waiting briefly for the client's config), else None."""
        deadline = time.monotonic() + HELLO_WAIT
        while True:
            entry = self.entries.get(hello.session_id)
            if entry is not None and entry.inbound == 0 and _accepts(entry, peer, hello.token):
                return entry
            left = deadline - time.monotonic()
            if left <= 0 or entry is None or not self.enabled or entry.accept_from == peer:
                return None  # (the client named this peer, with another token: no need to wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await entry.changed.wait()

    async def _pushed_steps(
        self, entry: SessionPush, reader: asyncio.StreamReader, run_step: StepRunner
    ) -> None:
        peer = entry.accept_from
        while self.entries.get(entry.session.id) is entry:
            try:
                msg, tensors = await read_message(reader, self.limits, timeout=self.step_timeout)
            except (StreamClosed, TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                return
            if isinstance(msg, CloseInference):
                return
            if entry.accept_from != peer:  # the client named another previous server meanwhile
                return
            if not isinstance(msg, InferenceStep) or not msg.push or len(tensors) != 1:
                raise ProtocolError(f"push stream carried {getattr(msg, 'kind', msg)!r}, not a pushed step")
            entry.last_step_at = time.monotonic()
            await run_step(entry, msg, tensors[0])

    # --- RTTs -----------------------------------------------------------------------------------------

    async def probe_next(self, span_start: int, span_end: int) -> None:
        """Ping a few servers that could come after this span in a chain; their RTTs go into our record."""
        snapshot = await self._directory()
        if snapshot is None:
            return
        me = self.node.peer_id
        # servers holding the block right after our span (or starting inside it): the next hops of a chain
        candidates = [
            s.peer_id
            for s in snapshot.servers.values()
            if s.peer_id != me and (s.start <= span_end < s.end or span_start < s.start < span_end)
        ]
        for peer_id in self._rng.sample(candidates, min(PROBES_PER_ROUND, len(candidates))):
            with contextlib.suppress(Exception):
                await self.ping(peer_id)

    async def ping(self, peer_id: str) -> float:
        """One info round trip to ``peer_id`` on an opened stream (the open itself is not counted)."""
        reader, writer = await self.open_stream(peer_id, PROTOCOL_INFO)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                t0 = time.perf_counter()
                await write_message(writer, InfoRequest())
                msg, _ = await read_message(reader, self.limits)
                rtt = time.perf_counter() - t0
        finally:
            writer.close()
        if isinstance(msg, InfoResponse):
            self.rtts.record(peer_id, rtt)
        return rtt


def _accepts(entry: SessionPush, peer: str, token: str) -> bool:
    if entry.accept_token is None or entry.accept_from is None:
        return False
    token_ok = hmac.compare_digest(entry.accept_token.encode(), token.encode())
    return token_ok and hmac.compare_digest(entry.accept_from.encode(), peer.encode())


async def _refuse(writer: asyncio.StreamWriter, message: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await write_message(writer, ErrorReply(code="bad_request", message=message, retryable=False))


async def _close_link(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await write_message(writer, CloseInference())
    with contextlib.suppress(Exception):
        writer.close()


def _retrieve(task: asyncio.Task[asyncio.StreamWriter]) -> None:
    """Mark a failed link's exception as seen: it is reported when a push awaits the link."""
    if not task.cancelled():
        task.exception()
