"""The hivemind interface: identities, DHT records with subkeys, streams, clean shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

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


class _AnsweringDht:
    """A DHT whose every store and read returns ``answer`` (a future the test resolves)."""

    def __init__(self, answer: asyncio.Future[Any]) -> None:
        self.answer = answer

    def store_many(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return self.answer

    def get_many(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return self.answer


@pytest.mark.parametrize("call", ["store", "get"])
def test_a_cancellation_that_arrives_as_the_dht_answers_is_not_lost(call: str) -> None:
    """A stopping server cancels its announcement loop, maybe just as a DHT store returns. On Python 3.11,
    ``asyncio.wait_for`` then returned the store's result and dropped the cancellation, and the loop went on
    announcing until the server's stop gave up on it; the node's deadlines must not lose it."""

    async def scenario() -> None:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        node = object.__new__(SwarmNode)  # only the DHT is needed: no p2pd
        node._dht = _AnsweringDht(answer)  # type: ignore[assignment]
        if call == "store":
            task = asyncio.create_task(node.store_many([("k", "peer", 1)], SwarmNode.now() + 30))
        else:
            task = asyncio.create_task(node.get_many(["k"]))
        await asyncio.sleep(0)  # the call now waits for the DHT
        answer.set_result({"k": True})
        task.cancel()  # in the same moment
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
