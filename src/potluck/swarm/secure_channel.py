"""An authenticated, encrypted byte stream over TCP for the direct data path, bound to libp2p peer ids.

Handshake (one round trip, like the plain hello it replaces)::

    client -> server   b"PLKE", u8 len, protocol name, client ephemeral X25519 public key (32 bytes)
    server -> client   server ephemeral X25519 key (32), u8 len, server peer id, u16 len, public key proto,
                       u16 len, signature of the transcript by the server's libp2p identity key
    client -> server   (first encrypted record) u8 len, client peer id, u16 len, key proto, u16 len, signature

The transcript is the protocol name, both ephemeral keys and the server's peer id; the client checks the
signature against the peer id it expects (from the signed DHT record), so a relay answering with a victim's
peer id cannot complete the handshake: it does not hold the victim's key. The client signs the same transcript,
which gives the server an authenticated client peer id (for per-peer limits). Keys: HKDF-SHA256 over the X25519
secret, salted with the transcript hash (and, in a private swarm, keyed with the swarm key: a client without it
cannot produce a first record the server can open). Each direction then carries records
``u32 length + ChaCha20-Poly1305(plaintext)`` with a per-direction key and a counter nonce; a forged, reordered
or replayed record fails authentication and the connection is dropped.

All primitives come from ``cryptography``; this module only composes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from potluck.swarm.signing import (
    MAX_PEER_ID_CHARS,
    MAX_PUBLIC_KEY_BYTES,
    MAX_SIGNATURE_BYTES,
    IdentityKey,
    SignatureError,
    SwarmKey,
    verify_peer_signature,
)

HELLO_MAGIC = b"PLKE"
# 256 KiB: a 1 MiB payload chunk is 4 AEAD calls, and one record bounds what a reader buffers
MAX_RECORD_PLAINTEXT = 1 << 18
_TAG = 16
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_DOMAIN = b"potluck-direct-v1\x00"


class HandshakeError(ConnectionError):
    """The peer failed the handshake: wrong peer id, bad signature, wrong swarm key, or garbage."""


def _transcript(protocol: bytes, client_eph: bytes, server_eph: bytes, server_peer: bytes) -> bytes:
    return b"".join((_DOMAIN, bytes([len(protocol)]), protocol, client_eph, server_eph, server_peer))


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys(shared: bytes, transcript: bytes, swarm_key: SwarmKey | None) -> tuple[bytes, bytes]:
    info = b"potluck-direct-v1 keys" + (swarm_key.derive(b"direct") if swarm_key is not None else b"")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=hashlib.sha256(transcript).digest(), info=info
    ).derive(shared)
    return okm[:32], okm[32:]  # client->server, server->client


def _proof(identity: IdentityKey, message: bytes) -> bytes:
    peer = identity.peer_id.encode()
    pub = identity.inlined_public_key()
    sig = identity.sign(message)
    return bytes([len(peer)]) + peer + _U16.pack(len(pub)) + pub + _U16.pack(len(sig)) + sig


async def _read_proof(read: Any) -> tuple[str, bytes, bytes]:
    """(peer id, public key proto, signature), each length-checked before it is read."""
    peer_len = (await read(1))[0]
    if not 0 < peer_len <= MAX_PEER_ID_CHARS:
        raise HandshakeError("bad peer id length")
    peer = (await read(peer_len)).decode("ascii", "replace")
    (pub_len,) = _U16.unpack(await read(2))
    if pub_len > MAX_PUBLIC_KEY_BYTES:
        raise HandshakeError("oversized public key")
    pub = await read(pub_len) if pub_len else b""
    (sig_len,) = _U16.unpack(await read(2))
    if not 0 < sig_len <= MAX_SIGNATURE_BYTES:
        raise HandshakeError("bad signature length")
    return peer, pub, await read(sig_len)


class SecureReader:
    """Decrypts records from a raw ``asyncio.StreamReader``; offers ``readexactly`` and ``read`` like it."""

    def __init__(self, raw: asyncio.StreamReader, key: bytes):
        self._raw = raw
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0
        self._buf = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        """Decrypt one more record into the buffer; False on a clean EOF between records."""
        try:
            head = await self._raw.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ConnectionError("direct path: truncated record") from None
            self._eof = True
            return False
        (n,) = _U32.unpack(head)
        if not _TAG <= n <= MAX_RECORD_PLAINTEXT + _TAG:  # checked before reading a byte of it
            raise ConnectionError(f"direct path: bad record length {n}")
        try:
            sealed = await self._raw.readexactly(n)
        except asyncio.IncompleteReadError:
            raise ConnectionError("direct path: truncated record") from None
        nonce = b"\x00\x00\x00\x00" + self._counter.to_bytes(8, "big")
        self._counter += 1
        try:
            plain = self._aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise ConnectionError("direct path: record failed authentication") from None
        if self._buf:
            self._buf += plain
        else:
            self._buf = bytearray(plain)  # one copy, not an append to an empty buffer plus a slice later
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof or not await self._fill():
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
        if len(self._buf) == n:  # common: a payload chunk that ends a record
            out, self._buf = bytes(self._buf), bytearray()
            return out
        with memoryview(self._buf) as view:
            out = bytes(view[:n])
        del self._buf[:n]
        return out

    async def read(self, n: int = -1) -> bytes:
        if not self._buf and (self._eof or not await self._fill()):
            return b""
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def at_eof(self) -> bool:
        return self._eof and not self._buf


class SecureWriter:
    """Buffers writes and seals them into records on ``drain`` (or when a record's worth is pending)."""

    def __init__(self, raw: asyncio.StreamWriter, key: bytes):
        self._raw = raw
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0
        self._pending: list[Any] = []
        self._pending_bytes = 0

    def write(self, data: Any) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= MAX_RECORD_PLAINTEXT:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        view = memoryview(data).cast("B")
        out = []
        for start in range(0, len(view), MAX_RECORD_PLAINTEXT):
            nonce = b"\x00\x00\x00\x00" + self._counter.to_bytes(8, "big")
            self._counter += 1
            sealed = self._aead.encrypt(nonce, bytes(view[start : start + MAX_RECORD_PLAINTEXT]), None)
            out.append(_U32.pack(len(sealed)))
            out.append(sealed)
        self._raw.write(b"".join(out))

    async def drain(self) -> None:
        self._flush()
        await self._raw.drain()

    def close(self) -> None:
        if not self._raw.is_closing():
            self._flush()
        self._raw.close()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    async def wait_closed(self) -> None:
        await self._raw.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    protocol: str,
    expected_peer_id: str,
    identity: IdentityKey,
    swarm_key: SwarmKey | None = None,
) -> tuple[SecureReader, SecureWriter]:
    """Run the client side; raises ``HandshakeError`` unless the server proves it holds ``expected_peer_id``."""
    name = protocol.encode("ascii")
    ephemeral = X25519PrivateKey.generate()
    client_eph = _raw(ephemeral.public_key())
    writer.write(HELLO_MAGIC + bytes([len(name)]) + name + client_eph)
    await writer.drain()
    server_eph = await reader.readexactly(32)
    peer, pub, sig = await _read_proof(reader.readexactly)
    if peer != expected_peer_id:
        raise HandshakeError(f"direct path is peer {peer[-8:]}, not {expected_peer_id[-8:]}")
    transcript = _transcript(name, client_eph, server_eph, peer.encode())
    try:
        verify_peer_signature(peer, transcript, sig, pub)
    except SignatureError as e:
        raise HandshakeError(f"direct path claims peer {peer[-8:]} but cannot prove it: {e}") from None
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(server_eph))
    c2s, s2c = _keys(shared, transcript, swarm_key)
    secure_writer = SecureWriter(writer, c2s)
    secure_writer.write(_proof(identity, b"client\x00" + transcript))  # goes out with the first request
    return SecureReader(reader, s2c), secure_writer


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: IdentityKey,
    protocols: set[str],
    swarm_key: SwarmKey | None = None,
) -> tuple[str, str, SecureReader, SecureWriter]:
    """Run the server side; returns (protocol, authenticated client peer id, reader, writer)."""
    if await reader.readexactly(4) != HELLO_MAGIC:
        raise HandshakeError("not a potluck direct-path hello")
    name = await reader.readexactly((await reader.readexactly(1))[0])
    protocol = name.decode("ascii", "replace")
    if protocol not in protocols:
        raise HandshakeError(f"unknown protocol {protocol[:40]!r}")
    client_eph = await reader.readexactly(32)
    ephemeral = X25519PrivateKey.generate()
    server_eph = _raw(ephemeral.public_key())
    transcript = _transcript(name, client_eph, server_eph, identity.peer_id.encode())
    writer.write(server_eph + _proof(identity, transcript))
    await writer.drain()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(client_eph))
    except ValueError:
        raise HandshakeError("bad client key") from None  # e.g. a low-order point: all-zero shared secret
    c2s, s2c = _keys(shared, transcript, swarm_key)
    secure_reader = SecureReader(reader, c2s)
    try:
        client, pub, sig = await _read_proof(secure_reader.readexactly)
        verify_peer_signature(client, b"client\x00" + transcript, sig, pub)
    except (SignatureError, ConnectionError, asyncio.IncompleteReadError) as e:
        raise HandshakeError(f"client failed the handshake: {e}") from None
    return protocol, client, secure_reader, SecureWriter(writer, s2c)
