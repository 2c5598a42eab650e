"""Peer identities as signing keys, and signed (optionally swarm-key-sealed) DHT record values.

A peer's libp2p id is derived from its public key: an Ed25519 key (what potluck generates) is *inlined* in the
id ("12D3KooW..."), so anyone holding the id can check a signature without fetching a key; an RSA key (what
hivemind's ``generate_identity`` writes) is hashed into the id ("Qm..."), so its public key travels with the
signature and is checked against the hash. Either way, a valid signature under peer id P proves the signer holds
P's private key: the same key p2pd uses, so P is also who libp2p's TLS authenticates.

DHT values are signed over ``(key, subkey, value, expiration_time)``: the subkey must be the signer's own peer id
(only the owner can write its subkey), and replaying an old value with a later expiration breaks the signature.
With a swarm key, the signed envelope is also sealed with ChaCha20-Poly1305 under a key derived from it, so peers
without the swarm key can neither read records nor write ones that others accept.

Pure functions over bytes; the hivemind validator that applies them lives in ``transport.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass

import base58
import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# libp2p's crypto.proto: PublicKey/PrivateKey {1: KeyType key_type (varint), 2: bytes data}
KEY_TYPE_RSA = 0
KEY_TYPE_ED25519 = 1
_ED25519_PUB_PROTO_PREFIX = b"\x08\x01\x12\x20"  # key_type=Ed25519, data = 32 bytes
_ED25519_PEER_ID_PREFIX = b"\x00\x24" + _ED25519_PUB_PROTO_PREFIX  # identity multihash of that 36-byte proto
_SHA256_MULTIHASH_PREFIX = b"\x12\x20"
MAX_PEER_ID_CHARS = 128
MAX_PUBLIC_KEY_BYTES = 1024  # RSA-4096 public key protos are ~550 bytes
MAX_SIGNATURE_BYTES = 1024
MAX_SIGNED_VALUE_BYTES = 64 * 1024  # records are ~1 KiB; anything bigger is refused before parsing

_RECORD_MAGIC = b"PLS1"  # signed envelope: magic, u16 pub len, pub, u16 sig len, sig, value
_SEALED_MAGIC = b"PLE1"  # sealed envelope: magic, 12-byte nonce, ChaCha20-Poly1305(signed envelope)
_RECORD_DOMAIN = b"potluck-dht-record-v1\x00"
_U16 = struct.Struct(">H")


class SignatureError(ValueError):
    """A signature, key or envelope is malformed or does not verify."""


class IdentityKey:
    """A peer's private key (Ed25519 or RSA), the public key proto and the peer id derived from it."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        self.private_key = private_key
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            raw = private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            self.public_proto = _ED25519_PUB_PROTO_PREFIX + raw
        else:
            der = private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.public_proto = _proto(KEY_TYPE_RSA, der)
        self.peer_id = peer_id_from_public_proto(self.public_proto)

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_private_proto(cls, data: bytes) -> IdentityKey:
        """Parse a libp2p PrivateKey protobuf (the identity file p2pd reads)."""
        key_type, body = _parse_proto(data)
        if key_type == KEY_TYPE_ED25519 and len(body) in (64, 96):  # seed + public key (+ legacy copy)
            return cls(ed25519.Ed25519PrivateKey.from_private_bytes(body[:32]))
        if key_type == KEY_TYPE_RSA:
            key = serialization.load_der_private_key(body, password=None)
            if isinstance(key, rsa.RSAPrivateKey):
                return cls(key)
        raise SignatureError(f"unsupported identity key type {key_type} ({len(body)} bytes)")

    def private_proto(self) -> bytes:
        """The libp2p PrivateKey protobuf p2pd accepts as ``-id`` file."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            return _proto(KEY_TYPE_ED25519, seed + self.public_proto[4:])
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return _proto(KEY_TYPE_RSA, der)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        return self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def inlined_public_key(self) -> bytes:
        """What a signature must carry for verifiers: nothing for Ed25519 (it is in the peer id), else the proto."""
        return b"" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else self.public_proto


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _proto(key_type: int, data: bytes) -> bytes:
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 35:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    raise SignatureError("bad varint in key proto")


def _parse_proto(data: bytes) -> tuple[int, bytes]:
    """The two fields of a libp2p key proto, in the canonical order libp2p writes them."""
    if len(data) < 4 or data[0] != 0x08:
        raise SignatureError("not a libp2p key proto")
    key_type, pos = _read_varint(data, 1)
    if pos >= len(data) or data[pos] != 0x12:
        raise SignatureError("not a libp2p key proto")
    length, pos = _read_varint(data, pos + 1)
    if pos + length != len(data):
        raise SignatureError("key proto length mismatch")
    return key_type, data[pos:]


def peer_id_from_public_proto(public_proto: bytes) -> str:
    """libp2p's rule: protos of at most 42 bytes are inlined (identity multihash), longer ones are SHA-256'd."""
    if len(public_proto) <= 42:
        multihash = b"\x00" + bytes([len(public_proto)]) + public_proto
    else:
        multihash = _SHA256_MULTIHASH_PREFIX + hashlib.sha256(public_proto).digest()
    return base58.b58encode(multihash).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _peer_id_bytes(peer_id: str) -> bytes:
    if not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise SignatureError("bad peer id length")
    try:
        return base58.b58decode(peer_id)
    except ValueError as e:
        raise SignatureError(f"peer id is not base58: {e}") from None


@functools.lru_cache(maxsize=4096)
def _ed25519_key(raw: bytes) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def verify_peer_signature(peer_id: str, message: bytes, signature: bytes, public_proto: bytes = b"") -> None:
    """Raise ``SignatureError`` unless ``signature`` over ``message`` was made by the key behind ``peer_id``.

    ``public_proto`` is needed only for hashed (RSA) ids; it must hash to the id.
    """
    if len(signature) > MAX_SIGNATURE_BYTES or len(public_proto) > MAX_PUBLIC_KEY_BYTES:
        raise SignatureError("oversized signature or key")
    multihash = _peer_id_bytes(peer_id)
    try:
        if multihash.startswith(_ED25519_PEER_ID_PREFIX) and len(multihash) == 38:
            _ed25519_key(multihash[6:]).verify(signature, message)
            return
        if multihash.startswith(_SHA256_MULTIHASH_PREFIX) and len(multihash) == 34:
            if not public_proto or hashlib.sha256(public_proto).digest() != multihash[2:]:
                raise SignatureError("public key does not match the peer id")
            key_type, der = _parse_proto(public_proto)
            key = serialization.load_der_public_key(der) if key_type == KEY_TYPE_RSA else None
            if not isinstance(key, rsa.RSAPublicKey):
                raise SignatureError(f"unsupported key type {key_type}")
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            return
    except InvalidSignature:
        raise SignatureError(f"bad signature for peer {peer_id[-8:]}") from None
    except (ValueError, TypeError) as e:
        raise SignatureError(f"unverifiable key for peer {peer_id[-8:]}: {e}") from None
    raise SignatureError(f"peer id {peer_id[-8:]} names no supported key")


# --- DHT record envelopes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwarmKey:
    """A private swarm's shared secret (``--swarm-key FILE``) and the keys derived from it per use."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("a swarm key must hold at least 16 bytes of secret")

    @classmethod
    def from_file(cls, path: str) -> SwarmKey:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
        return cls(secret)

    def derive(self, purpose: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"potluck-swarm-key/" + purpose
        ).derive(self.secret)

    @functools.cached_property
    def record_aead(self) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(self.derive(b"dht-records"))


def new_swarm_key_secret() -> bytes:
    """32 random bytes, hex: what ``potluck keygen``-style tooling writes into a swarm key file."""
    return os.urandom(32).hex().encode("ascii")


def _record_message(key: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    return b"".join(
        (
            _RECORD_DOMAIN,
            struct.pack(">I", len(key)),
            key,
            struct.pack(">I", len(subkey)),
            subkey,
            struct.pack(">d", expiration_time),
            value,
        )
    )


def subkey_peer_id(subkey: bytes) -> str | None:
    """The peer id a (msgpack-serialized) DHT subkey names, or None if it is not a string."""
    if not 0 < len(subkey) <= MAX_PEER_ID_CHARS + 4:
        return None
    try:
        value = msgpack.unpackb(subkey, max_str_len=MAX_PEER_ID_CHARS, max_bin_len=0, max_array_len=0)
    except Exception:
        return None
    return value if isinstance(value, str) and value else None


def _aad(key: bytes, subkey: bytes, expiration_time: float) -> bytes:
    return struct.pack(">I", len(key)) + key + subkey + struct.pack(">d", expiration_time)


def sign_record(
    identity: IdentityKey,
    key: bytes,
    subkey: bytes,
    value: bytes,
    expiration_time: float,
    swarm_key: SwarmKey | None = None,
) -> bytes:
    """The stored form of ``value``: signed by ``identity`` (and sealed with the swarm key, if any)."""
    signature = identity.sign(_record_message(key, subkey, value, expiration_time))
    pub = identity.inlined_public_key()
    envelope = _RECORD_MAGIC + _U16.pack(len(pub)) + pub + _U16.pack(len(signature)) + signature + value
    if swarm_key is None:
        return envelope
    nonce = os.urandom(12)
    return (
        _SEALED_MAGIC
        + nonce
        + swarm_key.record_aead.encrypt(nonce, envelope, _aad(key, subkey, expiration_time))
    )


def open_record(
    key: bytes, subkey: bytes, stored: bytes, expiration_time: float, swarm_key: SwarmKey | None = None
) -> bytes:
    """The original value of a stored record, after checking it: raises ``SignatureError`` unless the subkey is a
    peer id whose key signed exactly this (key, subkey, value, expiration) (and the swarm key sealed it)."""
    if len(stored) > MAX_SIGNED_VALUE_BYTES:
        raise SignatureError("oversized record")
    if swarm_key is not None:
        if not stored.startswith(_SEALED_MAGIC) or len(stored) < 4 + 12 + 16:
            raise SignatureError("record is not sealed with the swarm key")
        try:
            stored = swarm_key.record_aead.decrypt(
                stored[4:16], stored[16:], _aad(key, subkey, expiration_time)
            )
        except InvalidTag:
            raise SignatureError("record was sealed with another swarm key") from None
    peer_id = subkey_peer_id(subkey)
    if peer_id is None:
        raise SignatureError("record subkey is not a peer id")
    if not stored.startswith(_RECORD_MAGIC):
        raise SignatureError("record is not signed")
    try:
        pos = 4
        (pub_len,) = _U16.unpack_from(stored, pos)
        pub = stored[pos + 2 : pos + 2 + pub_len]
        pos += 2 + pub_len
        (sig_len,) = _U16.unpack_from(stored, pos)
        signature = stored[pos + 2 : pos + 2 + sig_len]
        pos += 2 + sig_len
    except struct.error:
        raise SignatureError("truncated record envelope") from None
    if len(pub) != pub_len or len(signature) != sig_len or pos > len(stored):
        raise SignatureError("truncated record envelope")
    value = stored[pos:]
    verify_peer_signature(peer_id, _record_message(key, subkey, value, expiration_time), signature, pub)
    return value
