"""Trust without a swarm: record signatures, the encrypted direct path's handshake, claim caps, byte budgets."""

from __future__ import annotations

import asyncio
import gc
import hashlib
from typing import Any

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa

from potluck.server.activations import ActivationCache, KeptForward, graph_bytes
from potluck.swarm.claims import cap_unobserved_claims
from potluck.swarm.direct import DirectConnectError, DirectServer, open_direct
from potluck.swarm.limits import ConnectionLimiter, raise_file_limit
from potluck.swarm.secure_channel import HELLO_MAGIC, _proof, _transcript
from potluck.swarm.signing import (
    IdentityKey,
    SignatureError,
    SwarmKey,
    open_record,
    peer_id_from_public_proto,
    sign_record,
)
from potluck.wire import (
    InfoRequest,
    ProtocolError,
    StreamClosed,
    TensorLimitError,
    read_message,
    write_message,
)
from potluck.wire.framing import encode_message
from potluck.wire.messages import ForwardRequest
from potluck.wire.tensors import DEFAULT_LIMITS, InflightBudget
from swarm_records import rec, snap

KEY = hashlib.sha256(b"potluck-block-key").digest()


def _subkey(peer_id: str) -> bytes:
    return msgpack.packb(peer_id)  # type: ignore[no-any-return]


# --- signed records -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_a_record_opens_only_for_its_owner_key_value_and_expiration(kind: str) -> None:
    owner = (
        IdentityKey.generate()
        if kind == "ed25519"
        else IdentityKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    assert owner.peer_id.startswith("12D3KooW" if kind == "ed25519" else "Qm")
    assert IdentityKey.from_private_proto(owner.private_proto()).peer_id == owner.peer_id
    value = msgpack.packb({"state": "online", "start": 0, "end": 8})
    stored = sign_record(owner, KEY, _subkey(owner.peer_id), value, 1000.0)
    assert open_record(KEY, _subkey(owner.peer_id), stored, 1000.0) == value

    attacker = IdentityKey.generate()
    with pytest.raises(SignatureError):  # another peer's subkey, signed by the attacker
        open_record(
            KEY,
            _subkey(owner.peer_id),
            sign_record(attacker, KEY, _subkey(owner.peer_id), value, 1000.0),
            1000.0,
        )
    with pytest.raises(SignatureError):  # the owner's signature replayed with a later expiration
        open_record(KEY, _subkey(owner.peer_id), stored, 5000.0)
    with pytest.raises(SignatureError):  # moved to another block's key
        open_record(hashlib.sha256(b"other").digest(), _subkey(owner.peer_id), stored, 1000.0)
    tampered = stored[:-3] + b"\x00\x00\x00"  # e.g. "online" -> something else
    with pytest.raises(SignatureError):
        open_record(KEY, _subkey(owner.peer_id), tampered, 1000.0)
    with pytest.raises(SignatureError):  # unsigned msgpack, as an old or hostile peer would store
        open_record(KEY, _subkey(owner.peer_id), value, 1000.0)
    for junk in (b"", b"PLS1", b"PLS1\xff\xff", b"PLS1\x00\x00\xff\xff" + b"x" * 10, b"\x00" * 70000):
        with pytest.raises(SignatureError):
            open_record(KEY, _subkey(owner.peer_id), junk, 1000.0)
    with pytest.raises(SignatureError):  # a subkey that is not a peer id string
        open_record(KEY, msgpack.packb(None), stored, 1000.0)


def test_an_invented_peer_id_cannot_be_signed_for() -> None:
    attacker = IdentityKey.generate()
    invented = peer_id_from_public_proto(b"\x08\x01\x12\x20" + bytes(range(32)))  # a key nobody holds
    value = msgpack.packb({"state": "online", "throughput": 1e12})
    with pytest.raises(SignatureError):
        open_record(KEY, _subkey(invented), sign_record(attacker, KEY, _subkey(invented), value, 1.0), 1.0)
    # an RSA-style id needs the key that hashes to it
    qm_id = peer_id_from_public_proto(b"\x08\x00\x12\x30" + bytes(48))
    with pytest.raises(SignatureError):
        open_record(KEY, _subkey(qm_id), sign_record(attacker, KEY, _subkey(qm_id), value, 1.0), 1.0)


def test_swarm_key_seals_records() -> None:
    owner = IdentityKey.generate()
    swarm_key, other_key = SwarmKey(b"a" * 32), SwarmKey(b"b" * 32)
    value = msgpack.packb({"state": "online"})
    sealed = sign_record(owner, KEY, _subkey(owner.peer_id), value, 1.0, swarm_key)
    assert value not in sealed  # outsiders cannot read it
    assert open_record(KEY, _subkey(owner.peer_id), sealed, 1.0, swarm_key) == value
    with pytest.raises(SignatureError):
        open_record(KEY, _subkey(owner.peer_id), sealed, 1.0, other_key)
    with pytest.raises(
        SignatureError
    ):  # a member's signed but unsealed record: an outsider could have relayed it
        open_record(
            KEY,
            _subkey(owner.peer_id),
            sign_record(owner, KEY, _subkey(owner.peer_id), value, 1.0),
            1.0,
            swarm_key,
        )


# --- claims ---------------------------------------------------------------------------------------------------


def test_unobserved_claims_are_capped_at_the_median_and_observations_win() -> None:
    s = snap(
        4,
        a=rec(0, 4, throughput=100.0, inference_rps=50.0),
        b=rec(0, 4, throughput=120.0, inference_rps=60.0),
        c=rec(0, 4, throughput=80.0, inference_rps=40.0),
        liar=rec(0, 4, throughput=1e12, inference_rps=1e12, forward_rps=1e12),
    )
    capped = cap_unobserved_claims(s)
    assert capped.servers["liar"].record.throughput == 110.0  # median of 80, 100, 120, 1e12
    assert capped.servers["liar"].record.inference_rps == 55.0
    assert capped.servers["c"].record.throughput == 80.0  # below the median: unchanged
    observed = cap_unobserved_claims(s, {"liar": 3.0, "c": 500.0})
    assert observed.servers["liar"].record.inference_rps == 3.0
    assert observed.servers["c"].record.inference_rps == 500.0  # a measurement above the median is believed
    assert cap_unobserved_claims(s, trusted=("liar",)).servers["liar"].record.throughput == 1e12


# --- direct path handshake ------------------------------------------------------------------------------------


async def _echo(peer: str, reader: Any, writer: Any) -> None:
    msg, tensors = await read_message(reader)
    await write_message(writer, msg, tensors)


def test_direct_path_refuses_a_relay_with_a_victims_peer_id_and_carries_no_plaintext() -> None:
    victim, relay_key, client = IdentityKey.generate(), IdentityKey.generate(), IdentityKey.generate()

    async def scenario() -> None:
        server = DirectServer(victim, {"echo": _echo})
        port = await server.start("127.0.0.1", 0)

        # A capturing TCP proxy in front of the honest server: what a packet capture on the path would see.
        captured = bytearray()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1 << 16):
                captured.extend(data)
                w.write(data)
                await w.drain()
            w.close()

        async def proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

        proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        hidden = torch.arange(4096, dtype=torch.float32).reshape(1, 4, 1024) / 7  # [B, T, H]
        reader, writer = await open_direct(
            f"127.0.0.1:{proxy_port}", "echo", victim.peer_id, timeout=5, identity=client
        )
        req = ForwardRequest(model="m", start=0, end=1)
        await write_message(writer, req, [hidden])
        msg, tensors = await read_message(reader, timeout=10)
        assert msg == req and torch.equal(tensors[0], hidden)
        writer.close()
        plain = b"".join(bytes(p) for p in encode_message(req, [hidden]))
        assert len(captured) > len(plain)  # the frame crossed the proxy both ways
        for i in range(0, len(plain) - 32, 16):  # no 32-byte window of the frame (header or tensor) in clear
            assert plain[i : i + 32] not in captured
        assert b"forward_request" not in captured and b"PLK1" not in captured

        # A relay that answers the hello as the victim: right peer id, but its own (or no valid) signature.
        async def impostor(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.readexactly(4) == HELLO_MAGIC
            name = await r.readexactly((await r.readexactly(1))[0])
            client_eph = await r.readexactly(32)
            server_eph = bytes(32 * [9])
            forged = _proof(relay_key, _transcript(name, client_eph, server_eph, victim.peer_id.encode()))
            forged = (
                bytes([len(victim.peer_id)]) + victim.peer_id.encode() + forged[1 + len(relay_key.peer_id) :]
            )
            w.write(server_eph + forged)
            await w.drain()
            await r.read()

        relay = await asyncio.start_server(impostor, "127.0.0.1", 0)
        relay_port = relay.sockets[0].getsockname()[1]
        with pytest.raises(DirectConnectError, match="cannot prove"):
            await open_direct(f"127.0.0.1:{relay_port}", "echo", victim.peer_id, timeout=5, identity=client)
        with pytest.raises(DirectConnectError, match="not"):  # honest server, but not the peer we expect
            await open_direct(f"127.0.0.1:{port}", "echo", relay_key.peer_id, timeout=5, identity=client)
        for srv in (relay, proxy_server):
            srv.close()
        await server.close()

    asyncio.run(scenario())


def test_direct_path_with_a_swarm_key_refuses_outsiders() -> None:
    server_key, client = IdentityKey.generate(), IdentityKey.generate()
    swarm_key = SwarmKey(b"s" * 32)

    async def scenario() -> None:
        server = DirectServer(server_key, {"echo": _echo}, swarm_key=swarm_key)
        port = await server.start("127.0.0.1", 0)
        addr = f"127.0.0.1:{port}"
        r, w = await open_direct(
            addr, "echo", server_key.peer_id, timeout=5, identity=client, swarm_key=swarm_key
        )
        await write_message(w, InfoRequest())
        assert isinstance((await read_message(r, timeout=10))[0], InfoRequest)
        w.close()
        r, w = await open_direct(addr, "echo", server_key.peer_id, timeout=5, identity=client)  # no swarm key
        await write_message(w, InfoRequest())
        with pytest.raises((ProtocolError, StreamClosed, ConnectionError)):
            await read_message(r, timeout=10)  # the server could not open our first record and hung up
        w.close()
        await server.close()

    asyncio.run(scenario())


def test_connection_limiter_counts_per_peer_and_total() -> None:
    limiter = ConnectionLimiter(per_peer=2, total=3)
    assert limiter.try_acquire("a") and limiter.try_acquire("a")
    assert not limiter.try_acquire("a")  # per peer
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("c")  # total
    limiter.release("a")
    assert limiter.try_acquire("c") and len(limiter) == 3 and limiter.refused == 2


# --- byte budgets ---------------------------------------------------------------------------------------------


def test_inflight_budget_refuses_at_the_header_and_frees_truncated_frames() -> None:
    limits = DEFAULT_LIMITS.__class__(inflight=InflightBudget(3 << 20))
    frame = b"".join(bytes(p) for p in encode_message(InfoRequest(), [torch.zeros(1 << 19)]))  # 2 MiB payload

    async def scenario() -> None:
        first = asyncio.StreamReader()
        first.feed_data(frame[:-1])  # all but the last byte: the frame stays in flight
        task = asyncio.create_task(read_message(first, limits))
        await asyncio.sleep(0.05)
        assert limits.inflight is not None and limits.inflight.used == 2 << 20
        second = asyncio.StreamReader()
        second.feed_data(frame)
        second.feed_eof()
        with pytest.raises(
            TensorLimitError, match="server busy"
        ):  # refused from its header, nothing buffered
            await read_message(second, limits)
        first.feed_eof()  # truncated
        with pytest.raises(ProtocolError, match="truncated"):
            await task
        assert limits.inflight.used == 0  # released at once, not at garbage collection
        third = asyncio.StreamReader()
        third.feed_data(frame)
        await read_message(third, limits)
        assert limits.inflight.used == 0

    gc.disable()
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()


def test_activation_cache_counts_graph_bytes_and_stays_within_budget() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))

    def kept() -> KeptForward:
        x = torch.randn(4, 64, 256, requires_grad=True)  # [B, T, H]
        out = layer(x)
        return KeptForward(out, [x], 0, 1, kept_at=__import__("time").monotonic())

    one = kept()
    nbytes = graph_bytes(one.output, one.leaves)
    assert nbytes >= 3 * 4 * 64 * 1024 * 4  # at least the 1024-wide activations saved for backward
    cache = ActivationCache(capacity=100, ttl=60.0, max_bytes=int(2.5 * nbytes))
    keys = [cache.put(kept()) for _ in range(5)]
    assert all(keys) and len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.pop(keys[0], 0, 1) is None and cache.pop(keys[-1], 0, 1) is not None  # oldest evicted
    assert (
        cache.put(KeptForward(one.output, one.leaves, 0, 1, 0.0, nbytes=10 * nbytes)) is None
    )  # too big to keep
    cache.ttl = 0.0
    cache.expire()
    assert len(cache) == 0 and cache.nbytes == 0


def test_file_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft > 64:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (64, hard)
            )  # lowering the soft limit is always allowed
        assert raise_file_limit() == (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= min(hard, 1 << 20)
    finally:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard)
        )
