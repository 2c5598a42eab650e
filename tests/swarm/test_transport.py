"""The hivemind interface: identities, DHT records with subkeys, streams, clean shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

from potluck.swarm.transport import NodeOptions, SwarmNode


def test_identity_file_keeps_the_peer_id_and_records_and_streams_work(tmp_path: Path) -> None:
    identity = str(tmp_path / "id.key")

    async def scenario() -> None:
        first = await SwarmNode.create(NodeOptions(host="127.0.0.1", identity_path=identity))
        peer_id = first.peer_id
        await first.shutdown()
        boot = await SwarmNode.create(NodeOptions(host="127.0.0.1", identity_path=identity))
        assert boot.peer_id == peer_id  # same key file, same peer id across restarts
        maddrs = await boot.visible_maddrs()
        assert all(m.endswith(f"/p2p/{peer_id}") and m.startswith("/ip4/127.0.0.1/tcp/") for m in maddrs)
        peer = await SwarmNode.create(NodeOptions(host="127.0.0.1", initial_peers=tuple(maddrs)))
        client = await SwarmNode.create(
            NodeOptions(host="127.0.0.1", initial_peers=tuple(maddrs), client_mode=True)
        )
        try:
            now = SwarmNode.now()
            assert await peer.store_many(
                [("k", peer.peer_id, {"x": 1}), ("j", peer.peer_id, {"x": 2})], now + 30
            )
            assert await boot.store_many([("k", boot.peer_id, {"x": 3})], now + 30)
            # only the owner may write its subkey: a value under another peer's id is refused by everyone
            assert not await peer.store_many([("k", boot.peer_id, {"x": 666})], now + 60)
            found = await client.get_many(["k", "j", "missing"])
            assert found == {
                "k": {peer.peer_id: {"x": 1}, boot.peer_id: {"x": 3}},
                "j": {peer.peer_id: {"x": 2}},
                "missing": {},
            }

            async def echo(remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                assert remote == client.peer_id
                writer.write(await reader.readexactly(5))
                await writer.drain()

            await peer.add_stream_handler("echo", echo)
            reader, writer = await client.open_stream(peer.peer_id, "echo")
            writer.write(b"hello")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(5), timeout=10) == b"hello"
            writer.close()
        finally:
            for node in (client, peer, boot):
                await node.shutdown()

    asyncio.run(scenario())
