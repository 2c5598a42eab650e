"""An optional direct TCP data path beside libp2p, for servers clients can reach.

Every message through libp2p crosses two p2pd daemons (client's and server's) and the Unix sockets to them;
on a busy or virtualised host each crossing costs a process wake-up. A server that is reachable also listens on
a plain TCP port, announced in its DHT record, and clients use it when they can connect, falling back to libp2p
otherwise. The bytes on it are the same frames as on libp2p streams.

A connection starts with a handshake (``secure_channel.py``): the server proves it holds the private key of the
peer id the client expects (the one in its signed DHT record), both sides derive ChaCha20-Poly1305 keys from an
X25519 exchange, and the client proves its own peer id. A stale address (another server now on that port) or a
relay answering with a victim's peer id fails the handshake, and the client falls back to libp2p.

Bounds: a connection that has not finished its handshake within ``HANDSHAKE_TIMEOUT`` is dropped; at most
``max_pending`` handshakes wait at once (the oldest is dropped for a new one, so idle sockets cannot lock others
out); after the handshake, at most ``per_peer`` connections per client peer id and ``total`` in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from potluck.errors import TransportError
from potluck.swarm import link
from potluck.swarm.limits import ConnectionLimiter
from potluck.swarm.secure_channel import HandshakeError, client_handshake, server_handshake
from potluck.swarm.signing import IdentityKey, SwarmKey
from potluck.swarm.transport import STREAM_LINGER_SECONDS, StreamHandler, SwarmNode, linger

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # a connection that has not completed its handshake within this long is dropped


class DirectConnectError(TransportError):
    """The direct path to a server cannot be used (unreachable, wrong peer, refused protocol)."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DirectServer:
    """Serves ``handlers`` (protocol name -> handler) over authenticated, encrypted TCP."""

    def __init__(
        self,
        identity: IdentityKey,
        handlers: Mapping[str, StreamHandler],
        *,
        swarm_key: SwarmKey | None = None,
        per_peer: int = 64,
        total: int = 1024,
        max_pending: int = 128,
    ):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.handlers = dict(handlers)
        self.swarm_key = swarm_key
        self.limiter = ConnectionLimiter(per_peer, total)
        self.max_pending = max_pending
        self._pending: OrderedDict[asyncio.Task[Any], None] = OrderedDict()  # handshaking, oldest first
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._on_connection, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def _admit(self, task: asyncio.Task[Any]) -> bool:
        """Make room for one more handshake: drop the oldest pending one when the pending or total limit is hit."""
        while self._pending and (
            len(self._pending) >= self.max_pending
            or len(self._pending) + len(self.limiter) >= self.limiter.total
        ):
            oldest, _ = self._pending.popitem(last=False)
            oldest.cancel()
        if len(self._pending) + len(self.limiter) >= self.limiter.total:
            return False
        self._pending[task] = None
        return True

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client: str | None = None
        try:
            if not self._admit(task):
                return
            _nodelay(writer)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    protocol, client, sreader, swriter = await server_handshake(
                        reader, writer, self.identity, set(self.handlers), self.swarm_key
                    )
            finally:
                self._pending.pop(task, None)
            if not self.limiter.try_acquire(client):
                client = None
                return
            swriter = link.shape(swriter)  # emulated WAN delay on what we send (none unless configured)
            await self.handlers[protocol](client, sreader, swriter)  # type: ignore[arg-type]
            await linger(sreader, STREAM_LINGER_SECONDS)  # type: ignore[arg-type]
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError) as e:
            if isinstance(e, HandshakeError):
                logger.debug("direct connection refused: %s", e)
        except Exception:
            logger.exception("direct connection failed")
        finally:
            if client is not None:
                self.limiter.release(client)
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()


async def open_direct(
    addr: str,
    protocol: str,
    expected_peer_id: str,
    *,
    timeout: float,
    identity: IdentityKey,
    swarm_key: SwarmKey | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``addr`` ("host:port") and run the handshake: the server must prove it is ``expected_peer_id``.

    The returned reader/writer encrypt transparently (they offer the StreamReader/StreamWriter methods potluck
    uses: readexactly, read, write, drain, close)."""
    host, _, port = addr.rpartition(":")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            _nodelay(writer)
            sreader, swriter = await client_handshake(
                reader, writer, protocol, expected_peer_id, identity, swarm_key
            )
    except (
        OSError,
        TimeoutError,
        asyncio.IncompleteReadError,
        ValueError,
    ) as e:  # HandshakeError is an OSError
        if writer is not None:
            writer.close()
        raise DirectConnectError(f"direct path {addr} unusable: {type(e).__name__}: {e}") from e
    return sreader, link.shape(swriter)  # type: ignore[return-value]


async def open_direct_first(
    node: SwarmNode,
    peer_id: str,
    protocol: str,
    direct_addrs: Sequence[str],
    *,
    timeout: float,
    direct_timeout: float,
    on_direct_failed: Callable[[], None] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``peer_id``: the first of its announced direct addresses that completes the handshake (each
    tried for at most ``direct_timeout``), else libp2p (``timeout``). Clients and servers (push) both open streams
    this way. ``on_direct_failed`` is called before falling back when addresses were tried and none worked (a
    client then skips them for a while)."""
    for addr in direct_addrs:
        try:
            return await open_direct(
                addr,
                protocol,
                peer_id,
                timeout=direct_timeout,
                identity=node.identity,
                swarm_key=node.swarm_key,
            )
        except DirectConnectError as e:
            logger.debug("%s", e)
    if direct_addrs and on_direct_failed is not None:
        on_direct_failed()
    return await node.open_stream(peer_id, protocol, timeout=timeout)
