"""A thin interface over hivemind: one libp2p peer (its p2pd) plus a Kademlia DHT node, in our event loop.

Everything potluck needs from the network goes through ``SwarmNode``: DHT store/get of typed records and raw
bidirectional byte streams to peers (our own framing runs on top, see ``potluck.wire.framing``). Keeping the
hivemind surface this small means a future transport (QUIC, plain TCP + rendezvous) replaces one module.

We run hivemind's ``DHTNode`` in-process on our own ``P2P`` instead of ``hivemind.DHT``: the latter forks a
process with a second p2pd, which doubles memory and makes shutdown harder to get right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from potluck.swarm.node_options import NodeOptions

logger = logging.getLogger(__name__)

STREAM_LINGER_SECONDS = 10.0  # after its last reply, a server waits this long for the client to hang up

StreamHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class SwarmError(RuntimeError):
    """The swarm could not be joined or reached."""


def _daemon_error(error: Exception, options: NodeOptions) -> SwarmError:
    """p2pd's own messages, translated into what the user should check."""
    text = str(error)
    peers = ", ".join(options.initial_peers) or "(none)"
    if "failed to connect to bootstrap peers" in text:
        return SwarmError(
            f"could not reach any initial peer ({peers}): check that the bootstrap peer is running there "
            "and that the address is the one it printed"
        )
    if "address already in use" in text:
        return SwarmError(
            f"port {options.port} on {options.host} is already in use: pass another --port, or 0 for any free port"
        )
    return SwarmError(f"could not start the libp2p daemon (p2pd): {text}")


class SwarmNode:
    """One peer of the swarm. Create with ``await SwarmNode.create(options)``; always ``await shutdown()``."""

    def __init__(self, p2p: P2P, dht: DHTNode, options: NodeOptions):
        self._p2p = p2p
        self._dht = dht
        self.options = options
        self.peer_id: str = p2p.peer_id.to_base58()
        self._closed = False

    @classmethod
    async def create(cls, options: NodeOptions) -> SwarmNode:
        _quiet_daemon_teardown(asyncio.get_running_loop())
        host_maddrs = [f"/ip4/{options.host}/tcp/{options.port}"]
        try:
            p2p = await asyncio.wait_for(
                P2P.create(
                    initial_peers=list(options.initial_peers) or None,
                    host_maddrs=host_maddrs,
                    announce_maddrs=list(options.announce_maddrs) or None,
                    identity_path=options.identity_path,
                    startup_timeout=options.startup_timeout,
                    use_relay=options.use_relay,
                    auto_nat=not options.client_mode and options.host != "127.0.0.1",
                    nat_port_map=False,
                    dht_mode="client" if options.client_mode else "server",
                ),
                timeout=options.startup_timeout + 5,
            )
        except Exception as e:  # hivemind raises a zoo of types here
            raise _daemon_error(e, options) from e
        try:
            dht = await asyncio.wait_for(
                DHTNode.create(
                    p2p=p2p,
                    initial_peers=list(options.initial_peers) or None,
                    client_mode=options.client_mode,
                    num_workers=8,
                    cache_refresh_before_expiry=0,
                    bootstrap_timeout=min(5.0, options.startup_timeout),
                    ensure_bootstrap_success=bool(options.initial_peers),
                ),
                timeout=options.startup_timeout,
            )
        except BaseException as e:  # also on cancellation (Ctrl-C): never leave the daemon running
            await p2p.shutdown()
            if not isinstance(e, Exception):
                raise
            peers = ", ".join(options.initial_peers) or "(none)"
            raise SwarmError(
                f"could not join the swarm through initial peers {peers}: {e}. "
                "Check that a bootstrap peer is running and the address is complete (/ip4/.../tcp/.../p2p/...)."
            ) from e
        return cls(p2p, dht, options)

    # --- addresses ------------------------------------------------------------------------------------

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) that others pass as initial peers."""
        maddrs = await asyncio.wait_for(self._p2p.get_visible_maddrs(), timeout=10)
        return [str(m) for m in maddrs]

    # --- DHT ------------------------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        """The DHT's clock (wall time), in which expirations are expressed."""
        return float(get_dht_time())

    async def store_many(
        self, items: Iterable[tuple[str, str, Any]], expiration_time: float, *, timeout: float = 10.0
    ) -> bool:
        """Store (key, subkey, value) items expiring at ``expiration_time``; True if all were stored."""
        keys, subkeys, values = [], [], []
        for key, subkey, value in items:
            keys.append(key)
            subkeys.append(subkey)
            values.append(value)
        if not keys:
            return True
        result = await asyncio.wait_for(
            self._dht.store_many(keys, values, expiration_time, subkeys=subkeys), timeout=timeout
        )
        return all(result.values())

    async def get_many(self, keys: Sequence[str], *, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """For each key, its unexpired {subkey: value}; a key with nothing stored maps to {}."""
        found = await asyncio.wait_for(
            self._dht.get_many(list(keys), sufficient_expiration_time=float("inf")), timeout=timeout
        )
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            entry = found.get(key)
            value = getattr(entry, "value", None)
            out[key] = {}
            if isinstance(value, Mapping):
                for subkey, item in value.items():
                    out[key][str(subkey)] = getattr(item, "value", item)
        return out

    # --- streams --------------------------------------------------------------------------------------

    async def add_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``: ``handler(peer_id, reader, writer)`` runs once per incoming stream."""

        async def _on_stream(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(info.peer_id.to_base58(), reader, writer)
                await linger(reader, STREAM_LINGER_SECONDS)
            except Exception:
                logger.exception("stream handler %s failed", protocol)
            finally:
                writer.close()

        await self._p2p.add_binary_stream_handler(protocol, _on_stream)

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float = 10.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a new bidirectional byte stream to ``peer_id``'s handler for ``protocol``."""
        _info, reader, writer = await asyncio.wait_for(
            self._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), protocol), timeout=timeout
        )
        return reader, writer

    # --- lifecycle ------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop the DHT node and the p2pd daemon (waits for it to exit: no orphans, no zombies)."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._dht.shutdown(), timeout=5)
        except Exception as e:
            logger.debug("DHT shutdown: %s", e)
        try:
            await asyncio.wait_for(self._p2p.shutdown(), timeout=5)
        except Exception as e:
            logger.warning("p2pd shutdown: %s", e)
        logger.debug("node %s shut down in %.2fs", self.peer_id, time.monotonic() - t0)


def _quiet_daemon_teardown(loop: asyncio.AbstractEventLoop) -> None:
    """When p2pd stops, hivemind's reader of its control socket dies with a reset connection that nobody awaits;
    asyncio would print that as "Task exception was never retrieved" with a traceback on every clean shutdown."""
    previous = loop.get_exception_handler()
    if getattr(previous, "_potluck_quiet", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        task, error = context.get("future"), context.get("exception")
        coro = getattr(task, "get_coro", lambda: None)()
        name = getattr(coro, "__qualname__", "")
        if isinstance(error, (ConnectionError, asyncio.IncompleteReadError)) and name.startswith(
            "ControlClient."
        ):
            logger.debug("p2pd control connection closed: %r", error)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler._potluck_quiet = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


async def linger(reader: asyncio.StreamReader, timeout: float) -> None:
    """Wait for the peer to close its side before we close ours.

    Closing right after the last reply can make the daemon reset the stream while that reply is still in flight,
    and the peer then sees a dropped stream instead of the answer. Whatever the peer still sends is discarded.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass
