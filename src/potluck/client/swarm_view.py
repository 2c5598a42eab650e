"""The client's view of the swarm: a fresh snapshot of DHT records, measured RTTs, and bans.

Routing itself is pure (``potluck.swarm.routing``); this class only gathers its inputs and keeps them fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from potluck.client.config import ClientConfig
from potluck.errors import (
    LimitExceededError,
    MissingBlocksError,
    ModelMismatchError,
    RequestError,
    UnknownAdapterError,
)
from potluck.swarm.claims import cap_unobserved_claims
from potluck.swarm.direct import open_direct_first
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.push_routing import find_push_route
from potluck.swarm.records import SwarmSnapshot
from potluck.swarm.routing import (
    RouteHop,
    RouteRequirements,
    Unsuitable,
    UnsuitableKind,
    find_forward_route,
    find_inference_route,
    format_route,
    servers_without_quant,
    unservable_blocks_error,
)
from potluck.swarm.transport import NodeOptions, SwarmNode, TransportError

logger = logging.getLogger(__name__)

DIRECT_CONNECT_TIMEOUT = 2.0  # a direct path that does not connect this fast is not worth it
DIRECT_RETRY_AFTER = 60.0  # after a direct path failed, use libp2p for this long before trying it again
RTT_SMOOTHING = 0.3  # weight of a new RTT sample in the moving average


@dataclass
class Ban:
    until: float
    strikes: int


class SwarmView:
    """Owns the client's swarm node; all methods run on the client loop."""

    def __init__(self, node: SwarmNode, config: ClientConfig, model_prefix: str, num_blocks: int):
        self.node = node
        self.config = config
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.snapshot = SwarmSnapshot.from_block_entries(model_prefix, num_blocks, {}, now=time.time())
        self.rtts: dict[str, float] = {}
        self.observed_rps: dict[
            str, float
        ] = {}  # measured decode steps/s per block, per peer (trust over claims)
        self.suspects: set[str] = set()  # servers caught returning wrong outputs: never routed to again
        self.bans: dict[str, Ban] = {}
        self._refreshed_at = -math.inf
        self._refresh_lock = asyncio.Lock()
        self._updater: asyncio.Task[None] | None = None
        self._direct_failed: dict[str, float] = {}  # peer -> when its direct path last failed

    @classmethod
    async def create(cls, config: ClientConfig, model_prefix: str, num_blocks: int) -> SwarmView:
        if not config.initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr a bootstrap peer printed")
        node = await SwarmNode.create(
            NodeOptions(
                initial_peers=config.initial_peers,
                host=config.host,
                client_mode=True,
                startup_timeout=config.startup_timeout,
                swarm_key_path=config.swarm_key_file,
                link_delay_ms=config.link_delay_ms,
                link_mbps=config.link_mbps,
            )
        )
        view = cls(node, config, model_prefix, num_blocks)
        try:
            await view.refresh()
        except Exception:
            await node.shutdown()
            raise
        view._updater = asyncio.create_task(view._update_loop())
        return view

    async def close(self) -> None:
        if self._updater is not None:
            self._updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._updater
        await self.node.shutdown()

    # --- snapshot ------------------------------------------------------------------------------------

    async def refresh(self, *, min_age: float = 0.0) -> SwarmSnapshot:
        """Re-read every block's records from the DHT (skipped if the view is younger than ``min_age``)."""
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed_at < min_age:
                return self.snapshot
            self.snapshot = await fetch_snapshot(
                self.node, self.model_prefix, self.num_blocks, timeout=self.config.connect_timeout
            )
            self._refreshed_at = time.monotonic()
            return self.snapshot

    async def _update_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await self.refresh()
            except (TransportError, TimeoutError) as e:
                logger.debug("background swarm refresh failed: %s", e)

    # --- health ---------------------------------------------------------------------------------------

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        old = self.rtts.get(peer_id)
        self.rtts[peer_id] = seconds if old is None else (1 - RTT_SMOOTHING) * old + RTT_SMOOTHING * seconds

    def ban(self, peer_id: str, reason: str) -> float:
        """Avoid ``peer_id`` for a while, doubling the time on each repeated failure; returns the ban length."""
        prior = self.bans.get(peer_id)
        strikes = 1 if prior is None else prior.strikes + 1
        length = min(self.config.ban_base * 2 ** (strikes - 1), self.config.ban_max)
        self.bans[peer_id] = Ban(until=time.monotonic() + length, strikes=strikes)
        logger.warning("banning server %s for %.0fs: %s", peer_id[-8:], length, reason)
        return length

    def clear_ban(self, peer_id: str) -> None:
        self.bans.pop(peer_id, None)

    def record_step(self, peer_id: str, seconds: float, num_blocks: int) -> None:
        """A measured step of ``num_blocks`` blocks: routing then uses this rate instead of the server's claim."""
        if seconds > 0 and num_blocks > 0:
            rps = num_blocks / seconds
            old = self.observed_rps.get(peer_id)
            self.observed_rps[peer_id] = (
                rps if old is None else (1 - RTT_SMOOTHING) * old + RTT_SMOOTHING * rps
            )

    def mark_suspect(self, peer_id: str, reason: str) -> None:
        """Exclude a server that lied for the rest of this client's life (not just a ban's backoff)."""
        if peer_id not in self.suspects:
            logger.warning("server %s is a suspect and will not be used again: %s", peer_id[-8:], reason)
        self.suspects.add(peer_id)

    def routing_snapshot(self) -> SwarmSnapshot:
        """The snapshot routing sees: claims capped at the swarm median unless this client measured them."""
        return cap_unobserved_claims(self.snapshot, self.observed_rps)

    def excluded(self) -> set[str]:
        now = time.monotonic()
        out = {p for p, ban in self.bans.items() if ban.until > now}
        out.update(self.suspects)
        out.update(self.config.blocked_servers)
        if self.config.allowed_servers:
            out.update(p for p in self.snapshot.servers if p not in self.config.allowed_servers)
        out.update(servers_without_quant(self.snapshot, self.config.allowed_quant))
        return out

    # --- streams ---------------------------------------------------------------------------------------

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to ``peer_id``: its direct TCP path when announced and reachable, else libp2p."""
        server = self.snapshot.servers.get(peer_id)  # type: ignore[call-overload]
        addrs = server.record.direct_addrs if server is not None and self.config.use_direct else ()
        if self._direct_failed.get(peer_id, -math.inf) >= time.monotonic() - DIRECT_RETRY_AFTER:
            addrs = ()  # failed lately: libp2p until DIRECT_RETRY_AFTER has passed

        def direct_failed() -> None:
            self._direct_failed[peer_id] = time.monotonic()
            logger.info("server %s: direct path unreachable, using libp2p", peer_id[-8:])

        return await open_direct_first(
            self.node,
            peer_id,
            protocol,
            addrs,
            timeout=timeout,
            direct_timeout=min(timeout, DIRECT_CONNECT_TIMEOUT),
            on_direct_failed=direct_failed,
        )

    # --- routes ----------------------------------------------------------------------------------------

    async def route(
        self,
        start: int,
        end: int,
        *,
        batch_tokens: int,
        inference: bool,
        needs: RouteRequirements = RouteRequirements(),
        skip: Mapping[str, RequestError] | None = None,
    ) -> list[RouteHop]:
        """The best chain over [start, end) of servers that can serve ``needs``.

        ``skip``: servers that refused this call as beyond their limits (left out, not banned). When only such
        servers (or servers whose announcements show they cannot serve ``needs``) hold some blocks, raises that
        ``RequestError`` at once: waiting would not help. When nobody holds them, waits up to
        ``wait_for_servers`` for servers to appear, then raises ``MissingBlocksError``.
        """
        skip = skip or {}
        deadline = time.monotonic() + self.config.wait_for_servers
        delay = 0.25
        while True:
            banned = self.excluded() | set(skip)
            try:
                if inference:
                    # with push, server-to-server legs are priced by the servers' announced RTTs
                    find_route = find_push_route if self.config.push else find_inference_route
                    hops = find_route(
                        self.routing_snapshot(),
                        start,
                        end,
                        rtts=self.rtts,
                        batch_tokens=batch_tokens,
                        banned=banned,
                        needs=needs,
                    )
                else:
                    hops = find_forward_route(
                        self.routing_snapshot(), start, end, rtts=self.rtts, banned=banned, needs=needs
                    )
                if self.config.show_route:
                    logger.info("route %d:%d: %s", start, end, format_route(hops))
                return hops
            except MissingBlocksError as e:
                fatal = self._unservable(e, skip)
                if fatal is not None:
                    raise fatal from None
                if time.monotonic() >= deadline:
                    raise
            # Servers join by announcing in the DHT, which has no push: poll it, backing off, until the deadline.
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
            try:
                await self.refresh()
            except (TransportError, TimeoutError) as e:
                logger.debug("swarm refresh failed while waiting for servers: %s", e)

    def _unservable(self, error: MissingBlocksError, skip: Mapping[str, RequestError]) -> RequestError | None:
        """A RequestError if every missing block is held only by servers that cannot serve this request."""
        for peer_id, refusal in skip.items():
            span = self.snapshot.servers.get(peer_id)  # type: ignore[call-overload]
            if span is not None:
                error.unsuitable.append(
                    Unsuitable(peer_id, span.start, span.end, _KIND_OF.get(type(refusal), "limit_exceeded"),
                               str(refusal))
                )  # fmt: skip
        return unservable_blocks_error(error)


_KIND_OF: dict[type[RequestError], UnsuitableKind] = {
    ModelMismatchError: "model_mismatch",
    UnknownAdapterError: "unknown_adapter",
    LimitExceededError: "limit_exceeded",
}
