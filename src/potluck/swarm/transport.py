"""A thin interface over hivemind: one libp2p peer (its p2pd) plus a Kademlia DHT node, in our event loop.

Everything potluck needs from the network goes through ``SwarmNode``: DHT store/get of typed records and raw
bidirectional byte streams to peers (our own framing runs on top, see ``potluck.wire.framing``). Keeping the
hivemind surface this small means a future transport (QUIC, plain TCP + rendezvous) replaces one module.

We run hivemind's ``DHTNode`` in-process on our own ``P2P`` instead of ``hivemind.DHT``: the latter forks a
process with a second p2pd, which doubles memory and makes shutdown harder to get right.

Every call has its deadline from ``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11, ``wait_for``
drops a cancellation that arrives while the awaited call completes (it returns the result instead), so a stopping
server's announcement loop, cancelled during a DHT store, went on announcing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from potluck.errors import SwarmError, TransportError
from potluck.swarm import link
from potluck.swarm.limits import ConnectionLimiter
from potluck.swarm.node_options import NodeOptions
from potluck.swarm.signing import IdentityKey, SignatureError, SwarmKey, open_record, sign_record

logger = logging.getLogger(__name__)

STREAM_LINGER_SECONDS = 10.0  # after its last reply, a server waits this long for the client to hang up
STREAM_AUTH_TIMEOUT = 10.0  # in a private swarm, a stream must prove the swarm key within this long
_STREAM_NONCE_BYTES = 16
_STREAM_TAG_BYTES = 32

StreamHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


__all__ = ["NodeOptions", "SwarmError", "SwarmNode", "TransportError", "linger"]


class SignedRecordValidator(RecordValidatorBase):
    """Every DHT record must be signed by the peer its subkey names (see ``signing.py``).

    hivemind calls ``validate`` when a peer asks us to store a record and on every record another peer returns
    to our reads, so forged records are refused by honest storers and dropped by honest readers alike.
    """

    def __init__(self, identity: IdentityKey, swarm_key: SwarmKey | None):
        self.identity = identity
        self.swarm_key = swarm_key

    def validate(self, record: DHTRecord) -> bool:
        try:
            open_record(record.key, record.subkey, record.value, record.expiration_time, self.swarm_key)
        except SignatureError as e:
            logger.debug("dropping DHT record: %s", e)
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        # Values under other peers' subkeys are sent unsigned: every honest peer (ourselves included) refuses them.
        return sign_record(
            self.identity, record.key, record.subkey, record.value, record.expiration_time, self.swarm_key
        )

    def strip_value(self, record: DHTRecord) -> bytes:
        return open_record(record.key, record.subkey, record.value, record.expiration_time, self.swarm_key)

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def load_identity(path: str | None) -> tuple[IdentityKey, bool]:
    """The node's key: read from ``path``, or new (Ed25519; written to ``path`` when given). Returns (key, new)."""
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            return IdentityKey.from_private_proto(f.read(1 << 16)), False
    identity = IdentityKey.generate()
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_proto())
    return identity, True


def stream_auth_tag(swarm_key: SwarmKey, protocol: str, client: str, server: str, nonce: bytes) -> bytes:
    """What a stream opener in a private swarm sends first: an HMAC bound to both (libp2p-authenticated) peers."""
    message = b"\x00".join((protocol.encode(), client.encode(), server.encode(), nonce))
    return hmac.digest(swarm_key.derive(b"streams"), message, "sha256")


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

    def __init__(
        self,
        p2p: P2P,
        dht: DHTNode,
        options: NodeOptions,
        identity: IdentityKey,
        swarm_key: SwarmKey | None = None,
    ):
        self._p2p = p2p
        self._dht = dht
        self.options = options
        self.identity = identity  # the private key behind peer_id: signs records and direct-path handshakes
        self.swarm_key = swarm_key
        self.peer_id: str = p2p.peer_id.to_base58()
        if self.peer_id != identity.peer_id:
            raise SwarmError(f"p2pd runs as {self.peer_id}, not as the key's peer {identity.peer_id}")
        self.stream_limiter = ConnectionLimiter(options.max_streams_per_peer, options.max_streams_total)
        self._closed = False

    @classmethod
    async def create(cls, options: NodeOptions) -> SwarmNode:
        link.configure(options.link_delay_ms, options.link_mbps)
        _quiet_daemon_teardown(asyncio.get_running_loop())
        host_maddrs = [f"/ip4/{options.host}/tcp/{options.port}"]
        swarm_key = SwarmKey.from_file(options.swarm_key_path) if options.swarm_key_path else None
        identity, new = load_identity(options.identity_path)
        identity_path = options.identity_path
        scratch = None
        if identity_path is None:  # p2pd reads the key from a file: hand it a private one-off copy
            scratch = tempfile.TemporaryDirectory(prefix="potluck-id-")
            identity_path = os.path.join(scratch.name, "identity.key")
            fd = os.open(identity_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(identity.private_proto())
        try:
            async with asyncio.timeout(options.startup_timeout + 5):
                p2p = await P2P.create(
                    initial_peers=list(options.initial_peers) or None,
                    host_maddrs=host_maddrs,
                    announce_maddrs=list(options.announce_maddrs) or None,
                    identity_path=identity_path,
                    # hivemind's check parses RSA keys only and starts a second daemon; fresh keys are never taken
                    check_if_identity_free=not new and identity.inlined_public_key() != b"",
                    startup_timeout=options.startup_timeout,
                    use_relay=options.use_relay,
                    auto_nat=not options.client_mode and options.host != "127.0.0.1",
                    nat_port_map=False,
                    dht_mode="client" if options.client_mode else "server",
                )
        except Exception as e:  # hivemind raises a zoo of types here
            raise _daemon_error(e, options) from e
        finally:
            if scratch is not None:
                scratch.cleanup()
        try:
            async with asyncio.timeout(options.startup_timeout):
                dht = await DHTNode.create(
                    p2p=p2p,
                    record_validator=SignedRecordValidator(identity, swarm_key),
                    initial_peers=list(options.initial_peers) or None,
                    client_mode=options.client_mode,
                    num_workers=8,
                    cache_refresh_before_expiry=0,
                    bootstrap_timeout=min(5.0, options.startup_timeout),
                    ensure_bootstrap_success=bool(options.initial_peers),
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
        try:
            return cls(p2p, dht, options, identity, swarm_key)
        except Exception:
            await dht.shutdown()
            await p2p.shutdown()
            raise

    # --- addresses ------------------------------------------------------------------------------------

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) that others pass as initial peers."""
        async with asyncio.timeout(10):
            maddrs = await self._p2p.get_visible_maddrs()
        return [str(m) for m in maddrs]

    def socket_paths(self) -> list[str]:
        """The unix socket files through which this process talks to its p2pd. A clean :meth:`shutdown` removes
        them; a process killed outright leaves them in /tmp, for whoever killed it to remove (``LocalSwarm``)."""
        paths = []
        for name in ("_daemon_listen_maddr", "_client_listen_maddr"):  # hivemind keeps them private
            with contextlib.suppress(Exception):
                paths.append(str(getattr(self._p2p, name)["unix"]))
        return paths

    # --- DHT ------------------------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        """The DHT's clock (wall time), in which expirations are expressed."""
        return float(get_dht_time())

    async def store_many(
        self, items: Iterable[tuple[str, str, Any]], expiration_time: float, *, timeout: float = 10.0
    ) -> bool:
        """Store (key, subkey, value) items expiring at ``expiration_time``; True if all were stored.

        Values are signed with this node's key; peers accept only those under our own peer id as subkey.
        """
        keys, subkeys, values = [], [], []
        for key, subkey, value in items:
            keys.append(key)
            subkeys.append(subkey)
            values.append(value)
        if not keys:
            return True
        try:
            async with asyncio.timeout(timeout):
                result = await self._dht.store_many(keys, values, expiration_time, subkeys=subkeys)
        except TimeoutError:
            raise
        except Exception as e:  # hivemind / p2pd errors become ours, so callers never see library types
            raise TransportError(f"DHT store failed: {type(e).__name__}: {e}") from e
        return all(result.values())

    async def get_many(self, keys: Sequence[str], *, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """For each key, its unexpired {subkey: value}; a key with nothing stored maps to {}."""
        try:
            async with asyncio.timeout(timeout):
                found = await self._dht.get_many(list(keys), sufficient_expiration_time=float("inf"))
        except TimeoutError:
            raise
        except Exception as e:  # hivemind / p2pd errors become ours
            raise TransportError(f"DHT read failed: {type(e).__name__}: {e}") from e
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
            peer = info.peer_id.to_base58()
            writer = link.shape(writer)  # emulated WAN delay on what we send (none unless configured)
            if not self.stream_limiter.try_acquire(peer):
                writer.close()
                return
            try:
                if self.swarm_key is not None and not await self._check_stream_auth(protocol, peer, reader):
                    logger.info("stream %s from %s refused: no valid swarm-key proof", protocol, peer[-8:])
                    return
                await handler(peer, reader, writer)
                await linger(reader, STREAM_LINGER_SECONDS)
            except Exception:
                logger.exception("stream handler %s failed", protocol)
            finally:
                self.stream_limiter.release(peer)
                writer.close()

        await self._p2p.add_binary_stream_handler(protocol, _on_stream)

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float = 10.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a new bidirectional byte stream to ``peer_id``'s handler for ``protocol``.

        Raises ``TimeoutError`` or ``TransportError`` (never p2pd's own exception types).
        """
        try:
            async with asyncio.timeout(timeout):
                _info, reader, writer = await self._p2p.call_binary_stream_handler(
                    PeerID.from_base58(peer_id), protocol
                )
        except TimeoutError:
            raise
        except Exception as e:  # p2pd reports unreachable peers and refused protocols with its own types
            raise TransportError(f"cannot open {protocol} to {peer_id[-8:]}: {type(e).__name__}: {e}") from e
        if self.swarm_key is not None:
            nonce = os.urandom(_STREAM_NONCE_BYTES)
            writer.write(nonce + stream_auth_tag(self.swarm_key, protocol, self.peer_id, peer_id, nonce))
        return reader, link.shape(writer)

    async def _check_stream_auth(self, protocol: str, peer: str, reader: asyncio.StreamReader) -> bool:
        assert self.swarm_key is not None
        try:
            async with asyncio.timeout(STREAM_AUTH_TIMEOUT):
                proof = await reader.readexactly(_STREAM_NONCE_BYTES + _STREAM_TAG_BYTES)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return False
        nonce, tag = proof[:_STREAM_NONCE_BYTES], proof[_STREAM_NONCE_BYTES:]
        return hmac.compare_digest(tag, stream_auth_tag(self.swarm_key, protocol, peer, self.peer_id, nonce))

    # --- lifecycle ------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop the DHT node and the p2pd daemon (waits for it to exit: no orphans, no zombies)."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(5):
                await self._dht.shutdown()
        except Exception as e:
            logger.debug("DHT shutdown: %s", e)
        try:
            async with asyncio.timeout(5):
                await self._p2p.shutdown()
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
