"""An optional direct TCP data path beside libp2p, for servers clients can reach.

Every message through libp2p crosses two p2pd daemons (client's and server's) and the Unix sockets to them;
on a busy or virtualised host each crossing costs a process wake-up. A server that is reachable also listens on
a plain TCP port, announced in its DHT record, and clients use it when they can connect, falling back to libp2p
otherwise. The bytes on it are the same frames as on libp2p streams.

A connection starts with a hello: ``b"PLKD"``, a 1-byte length and the protocol name; the server answers with a
1-byte length and its peer id, which the client checks, so a stale address (another server now on that port)
is never used. This path is not encrypted: servers that must not expose activations in clear run with
``--no-direct``, and clients can refuse it with ``use_direct=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping

from potluck.swarm import link
from potluck.swarm.transport import STREAM_LINGER_SECONDS, StreamHandler, linger

logger = logging.getLogger(__name__)

HELLO_MAGIC = b"PLKD"
HELLO_TIMEOUT = 10.0  # a connection that does not say hello within this long is dropped


class DirectConnectError(ConnectionError):
    """The direct path to a server cannot be used (unreachable, wrong peer, refused protocol)."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DirectServer:
    """Serves ``handlers`` (protocol name -> handler) over plain TCP."""

    def __init__(self, peer_id: str, handlers: Mapping[str, StreamHandler]):
        self.peer_id = peer_id
        self.handlers = dict(handlers)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._on_connection, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        _nodelay(writer)
        peer = "direct:{}:{}".format(*(writer.get_extra_info("peername") or ("?", 0))[:2])
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                if await reader.readexactly(4) != HELLO_MAGIC:
                    return
                name = (await reader.readexactly((await reader.readexactly(1))[0])).decode("ascii", "replace")
            handler = self.handlers.get(name)
            if handler is None:
                logger.debug("direct connection from %s asked for unknown protocol %r", peer, name)
                return
            me = self.peer_id.encode()
            writer.write(bytes([len(me)]) + me)
            await writer.drain()
            writer = link.shape(writer)  # emulated WAN delay from here on (the hello is not data)
            await handler(peer, reader, writer)
            await linger(reader, STREAM_LINGER_SECONDS)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            logger.exception("direct connection from %s failed", peer)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)


async def open_direct(
    addr: str, protocol: str, expected_peer_id: str, *, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``addr`` ("host:port"), say hello for ``protocol`` and check the server is who we expect."""
    host, _, port = addr.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            _nodelay(writer)
            name = protocol.encode("ascii")
            writer.write(HELLO_MAGIC + bytes([len(name)]) + name)
            await writer.drain()
            peer = (await reader.readexactly((await reader.readexactly(1))[0])).decode("ascii", "replace")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        raise DirectConnectError(f"direct path {addr} unusable: {type(e).__name__}: {e}") from e
    if peer != expected_peer_id:
        writer.close()
        raise DirectConnectError(f"direct path {addr} is peer {peer[-8:]}, not {expected_peer_id[-8:]}")
    return reader, link.shape(writer)
