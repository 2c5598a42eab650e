"""Hostile peers against a loopback swarm: forged records, idle connection floods, memory held by truncated
frames and kept activations, and a private swarm refusing outsiders."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from hivemind.dht.validation import DHTRecord
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.swarm.direct import open_direct
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.limits import raise_file_limit
from potluck.swarm.records import (
    ServerRecord,
    ServerState,
    SwarmSnapshot,
    block_key,
    model_prefix_for,
    record_to_dht,
)
from potluck.swarm.signing import IdentityKey, SignatureError, open_record, peer_id_from_public_proto
from potluck.swarm.transport import NodeOptions, SignedRecordValidator, SwarmNode
from potluck.wire import (
    PROTOCOL_FORWARD,
    PROTOCOL_INFO,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InfoRequest,
    read_message,
    write_message,
)
from potluck.wire.framing import encode_message

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
PERIOD = 2.0  # --balance-check-period
MiB = 1 << 20
INFLIGHT_BUDGET = 64 * MiB
ACTIVATION_BUDGET = 32 * MiB


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two auto-placed servers (4 of 8 blocks each) with small byte budgets."""
    path = str(tiny_model_dir(KIND))
    args = [
        "--num-blocks", "4", "--update-period", "1", "--balance-check-period", str(PERIOD),
        "--start-delay-max", "2", "--throughput", "10",
        "--inflight-frame-bytes", str(INFLIGHT_BUDGET), "--activation-bytes", str(ACTIVATION_BUDGET),
    ]  # fmt: skip
    with LocalSwarm(tmp_path_factory.mktemp("trust-logs")) as s:
        s.start_bootstrap()
        procs = [s.start_server(path, None, name=f"auto{i}", wait=False, extra_args=args) for i in range(2)]
        s.wait_ready(procs)
        deadline = time.monotonic() + 60
        while _snapshot(s.initial_peers, path).missing_blocks():  # they may need a move to split the blocks
            assert time.monotonic() < deadline, "the two servers never covered all blocks"
            time.sleep(1.0)
        yield {"swarm": s, "path": path, "peers": s.initial_peers, "procs": procs}


def _snapshot(peers: list[str], path: str, **options: Any) -> SwarmSnapshot:
    async def read() -> SwarmSnapshot:
        node = await SwarmNode.create(
            NodeOptions(initial_peers=tuple(peers), host="127.0.0.1", client_mode=True, **options)
        )
        try:
            return await fetch_snapshot(node, model_prefix_for(path), 8)
        finally:
            await node.shutdown()

    return asyncio.run(read())


def _client(swarm: dict[str, Any], **kwargs: Any) -> Any:
    return AutoDistributedModelForCausalLM.from_pretrained(
        swarm["path"], initial_peers=swarm["peers"], load_tokenizer=False, **kwargs
    )


def _generate(swarm: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    prompt = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(3))
    with _client(swarm, **kwargs) as model, model.inference_session(max_length=32) as session:
        out = model.generate(prompt, max_new_tokens=8, eos_token_id=None)
        route = [(h.peer_id, h.hop.start, h.hop.end) for h in session.remote.hops]
    return out, route


def _moves(procs: list[SwarmProcess]) -> int:
    return sum(p.log_tail(100_000).count("rebalancing: moving") for p in procs)


class _Forger(SignedRecordValidator):
    """A hostile peer's validator: stores anything, and signs with its own key or not at all (``raw``)."""

    raw = False

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value if self.raw else super().sign_value(record)

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            return open_record(record.key, record.subkey, record.value, record.expiration_time)
        except SignatureError:
            return record.value if record.value[:4] != b"PLS1" else record.value[4 + 2 + 2 + 64 :]


def test_forged_records_change_no_route_output_or_placement(swarm: dict[str, Any]) -> None:
    path, procs = swarm["path"], swarm["procs"]
    prefix = model_prefix_for(path)
    before = _snapshot(swarm["peers"], path)
    spans = {pid: (s.start, s.end) for pid, s in before.servers.items()}
    assert set(spans) == {p.peer_id for p in procs}
    moves = _moves(procs)
    expected = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    honest_out, honest_route = _generate(swarm)
    prompt = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        honest_out, expected.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    )

    victim = procs[0].peer_id
    v_start, v_end = spans[victim]
    invented = peer_id_from_public_proto(b"\x08\x01\x12\x20" + bytes(range(32)))  # a key nobody holds
    common = dict(inference_rps=1e12, forward_rps=1e12, network_rps=1e12, cache_tokens_left=1 << 30)
    common |= dict(max_inference_length=8192, dtype="float32", version="0.1.0", announced_at=time.time() + 30)
    offline = ServerRecord(state=ServerState.offline, start=v_start, end=v_end, throughput=0.0, **common)
    fake = ServerRecord(state=ServerState.online, start=0, end=8, throughput=1e12, **common)

    async def forge() -> dict[str, dict[str, Any]]:
        hostile = await SwarmNode.create(NodeOptions(initial_peers=tuple(swarm["peers"]), host="127.0.0.1"))
        forger = _Forger(hostile.identity, None)
        hostile._dht.protocol.record_validator = forger  # test-only: this peer breaks the rules
        try:
            expire = SwarmNode.now() + 120
            for raw in (False, True):  # signed by the wrong key, then not signed at all
                forger.raw = raw
                await hostile.store_many(
                    [(block_key(prefix, b), victim, record_to_dht(offline)) for b in range(v_start, v_end)]
                    + [(block_key(prefix, b), invented, record_to_dht(fake)) for b in range(8)],
                    expire,
                )
            return await hostile.get_many([block_key(prefix, b) for b in range(8)])
        finally:
            await hostile.shutdown()

    seen_by_forger = asyncio.run(forge())
    # the forgeries are in the DHT (at least in the hostile peer's own storage, served to anyone who asks) ...
    assert any(invented in by_peer for by_peer in seen_by_forger.values())
    # ... but honest readers drop them: same servers, same spans and states, no invented peer
    after = _snapshot(swarm["peers"], path)
    assert {pid: (s.start, s.end, s.state) for pid, s in after.servers.items()} == {
        pid: (*span, ServerState.online) for pid, span in spans.items()
    }
    forged_out, forged_route = _generate(swarm)
    assert forged_route == honest_route and torch.equal(forged_out, honest_out)
    time.sleep(3 * PERIOD)  # auto-placed servers check for a better span every ~PERIOD: none moves
    assert _moves(procs) == moves
    final = _snapshot(swarm["peers"], path)
    assert {pid: (s.start, s.end) for pid, s in final.servers.items()} == spans


def test_idle_connections_from_one_peer_do_not_block_another(swarm: dict[str, Any]) -> None:
    raise_file_limit()
    target = swarm["procs"][0]
    snap = _snapshot(swarm["peers"], swarm["path"])
    host, _, port = snap.servers[target.peer_id].record.direct_addrs[0].rpartition(":")  # type: ignore[call-overload]
    flooder = IdentityKey.generate()

    async def flood() -> tuple[int, int, int]:
        raw = [await asyncio.open_connection(host, int(port)) for _ in range(500)]  # never say hello
        authed = [
            await open_direct(f"{host}:{port}", PROTOCOL_INFO, target.peer_id, timeout=10, identity=flooder)
            for _ in range(100)
        ]
        for _, w in authed:
            await w.drain()  # sends the client proof: the server now knows these are all one peer
        hostile = await SwarmNode.create(NodeOptions(initial_peers=tuple(swarm["peers"]), host="127.0.0.1"))
        streams = [await hostile.open_stream(target.peer_id, PROTOCOL_INFO) for _ in range(100)]  # idle too
        await asyncio.sleep(1.0)

        async def closed(r: Any) -> bool:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(r.read(1), timeout=0.05) == b""
            return False

        dropped = [sum([await closed(r) for r, _ in group]) for group in (raw, authed, streams)]
        # while all that is held open, another client generates over the direct path and over libp2p
        for use_direct in (True, False):
            out, route = await asyncio.to_thread(_generate, swarm, use_direct=use_direct)
            assert out.shape[1] == 15 and target.peer_id in [r[0] for r in route]
        for _, w in raw + authed + streams:
            w.close()
        await hostile.shutdown()
        return dropped[0], dropped[1], dropped[2]

    raw_dropped, authed_dropped, streams_dropped = asyncio.run(flood())
    assert raw_dropped >= 500 - 128  # pending handshakes beyond 128: the oldest are dropped
    assert authed_dropped >= 100 - 64  # 64 connections per peer on the direct path
    assert streams_dropped >= 100 - 64  # and 64 streams per peer on libp2p
    assert target.alive()


def _rss(proc: SwarmProcess) -> int:
    return int(psutil.Process(proc.popen.pid).memory_info().rss)


def test_truncated_frames_and_kept_activations_stay_within_byte_budgets(swarm: dict[str, Any]) -> None:
    target = swarm["procs"][1]
    snap = _snapshot(swarm["peers"], swarm["path"])
    span = snap.servers[target.peer_id]  # type: ignore[call-overload]
    addr = span.record.direct_addrs[0]
    client = IdentityKey.generate()
    prefix = model_prefix_for(swarm["path"])

    async def truncated_frames() -> tuple[int, int, int, list[str]]:
        base = _rss(target)
        # four frames of 48 MiB each, the last byte withheld: only what fits the 64 MiB budget is buffered
        big = torch.zeros(1, 48 * MiB // (4 * 64), 64)  # [B, T, H] float32, 48 MiB
        frame = b"".join(
            bytes(p)
            for p in encode_message(ForwardRequest(model=prefix, start=span.start, end=span.end), [big])
        )
        conns, refusals = [], []
        for _ in range(4):
            r, w = await open_direct(addr, PROTOCOL_FORWARD, target.peer_id, timeout=10, identity=client)
            w.write(frame[:-1])
            await w.drain()
            conns.append((r, w))
        await asyncio.sleep(2.0)
        peak = _rss(target)
        for r, _ in conns:
            with contextlib.suppress(TimeoutError):
                msg, _ = await read_message(r, timeout=0.5)
                if isinstance(msg, ErrorReply):
                    refusals.append(msg.message)
        for _, w in conns:
            w.close()
        await asyncio.sleep(2.0)
        return base, peak, _rss(target), refusals

    base, peak, after, refusals = asyncio.run(truncated_frames())
    print(f"truncated frames: rss {base / MiB:.0f} -> {peak / MiB:.0f} -> {after / MiB:.0f} MiB; {refusals}")
    assert len(refusals) == 3 and all("server busy" in m for m in refusals)  # refused from their headers
    assert peak - base < INFLIGHT_BUDGET + 24 * MiB  # not 4 x 48 MiB
    assert after - base < 24 * MiB  # the truncated frame was freed when its connection closed

    async def kept_activations() -> tuple[int, int, list[str | None]]:
        base = _rss(target)
        ids = []
        x = torch.randn(4, 256, 64)  # [B, T, H]
        for _ in range(32):  # ~12 MiB of graph each: 384 MiB if all were kept
            r, w = await open_direct(addr, PROTOCOL_FORWARD, target.peer_id, timeout=10, identity=client)
            req = ForwardRequest(model=prefix, start=span.start, end=span.end, keep_activations=True)
            await write_message(w, req, [x])
            msg, _ = await read_message(r, timeout=60)
            assert isinstance(msg, ForwardResult)
            ids.append(msg.activation_id)
            w.close()
        return base, _rss(target), ids

    base, peak, ids = asyncio.run(kept_activations())
    print(
        f"kept activations: rss {base / MiB:.0f} -> {peak / MiB:.0f} MiB; kept {sum(i is not None for i in ids)}"
    )
    assert sum(i is not None for i in ids) >= 8  # graphs are kept (oldest evicted), not refused wholesale
    # the budget plus one request's transient compute buffers and allocator slack
    assert peak - base < ACTIVATION_BUDGET + 48 * MiB


def test_private_swarm_refuses_outsiders(tiny_model_dir: Any, tmp_path: Path) -> None:
    path = str(tiny_model_dir(KIND))
    key_file = tmp_path / "swarm.key"
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef")
    with LocalSwarm(tmp_path / "logs") as s:
        s.start_bootstrap(extra_args=["--swarm-key", str(key_file)])
        server = s.start_server(path, (0, 8), name="private", extra_args=["--swarm-key", str(key_file)])
        peers = s.initial_peers
        members = _snapshot(peers, path, swarm_key_path=str(key_file))
        assert list(members.servers) == [server.peer_id]
        assert not _snapshot(peers, path).servers  # outsiders cannot read the (sealed) records

        async def outsider() -> tuple[bool, Any]:
            node = await SwarmNode.create(NodeOptions(initial_peers=tuple(peers), host="127.0.0.1"))
            try:
                fake = ServerRecord(
                    state=ServerState.online, start=0, end=8, throughput=1.0, inference_rps=1.0, forward_rps=1.0,
                    network_rps=1.0, cache_tokens_left=1, max_inference_length=1, dtype="float32", version="x",
                )  # fmt: skip
                stored = await node.store_many(
                    [(block_key(model_prefix_for(path), 0), node.peer_id, record_to_dht(fake))],
                    SwarmNode.now() + 60,
                )
                reader, writer = await node.open_stream(server.peer_id, PROTOCOL_INFO)
                await write_message(writer, InfoRequest())
                try:
                    reply = await read_message(reader, timeout=15)
                except Exception as e:
                    reply = e
                writer.close()
                return stored, reply
            finally:
                await node.shutdown()

        _stored, reply = asyncio.run(outsider())
        assert isinstance(reply, Exception)  # the server hung up: no swarm-key proof on the stream
        assert list(_snapshot(peers, path, swarm_key_path=str(key_file)).servers) == [server.peer_id]
        with AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=peers, load_tokenizer=False, swarm_key_file=str(key_file)
        ) as model:
            prompt = torch.randint(3, 250, (1, 5), generator=torch.Generator().manual_seed(1))
            out = model.generate(prompt, max_new_tokens=4, eos_token_id=None)
        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        assert torch.equal(out, hf.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None))
