"""Server-side limits: the KV-cache budget (wait, then a clear error), freeing on disconnect, step timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.swarm.transport import NodeOptions, SwarmNode
from potluck.wire import (
    ErrorReply,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    OpenInference,
    read_message,
    write_message,
)
from potluck.wire.protocols import PROTOCOL_INFERENCE, PROTOCOL_INFO

pytestmark = pytest.mark.swarm

CACHE_TOKENS = 64
STEP_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tiny_model_dir("llama-gqa-llama3rope")
    with LocalSwarm(tmp_path_factory.mktemp("logs")) as swarm:
        swarm.start_bootstrap()
        args = [
            "--cache-tokens",
            str(CACHE_TOKENS),
            "--step-timeout",
            str(STEP_TIMEOUT),
            "--model-prefix",
            "limits",
        ]
        proc = swarm.start_server(path, (0, 8), extra_args=args)
        yield {"proc": proc, "peers": swarm.initial_peers}


async def _node(peers: list[str]) -> SwarmNode:
    return await SwarmNode.create(NodeOptions(initial_peers=tuple(peers), host="127.0.0.1", client_mode=True))


async def _cache_left(node: SwarmNode, proc: SwarmProcess) -> int:
    reader, writer = await node.open_stream(proc.peer_id, PROTOCOL_INFO)
    await write_message(writer, InfoRequest())
    info, _ = await read_message(reader, timeout=10)
    writer.close()
    return int(info.cache_tokens_left)  # type: ignore[attr-defined]


async def _open(node: SwarmNode, proc: SwarmProcess, max_length: int, alloc_timeout: float) -> Any:
    reader, writer = await node.open_stream(proc.peer_id, PROTOCOL_INFERENCE)
    msg = OpenInference(
        model="limits", start=0, end=8, max_length=max_length, batch_size=1, alloc_timeout=alloc_timeout
    )
    await write_message(writer, msg)
    reply, _ = await read_message(reader, timeout=30)
    return reply, reader, writer


def test_cache_budget_waits_then_fails_clearly_and_frees_on_disconnect(server: dict[str, Any]) -> None:
    proc = server["proc"]

    async def scenario() -> None:
        node = await _node(server["peers"])
        try:
            assert await _cache_left(node, proc) == CACHE_TOKENS
            first, _, first_writer = await _open(node, proc, 40, 0)
            assert isinstance(first, InferenceOpened)
            assert await _cache_left(node, proc) == CACHE_TOKENS - 40
            refused, _, w = await _open(node, proc, 40, 0.5)  # does not fit while the first session lives
            w.close()
            assert isinstance(refused, ErrorReply) and refused.code == "cache_full" and refused.retryable
            assert "no KV-cache room for 40 tokens" in refused.message
            too_big, _, w = await _open(node, proc, CACHE_TOKENS + 1, 0)
            w.close()
            assert isinstance(too_big, ErrorReply) and "whole cache budget" in too_big.message

            # A waiting session gets the room as soon as the first client disappears (no goodbye, just gone).
            waiting = asyncio.create_task(_open(node, proc, 40, 10))
            await asyncio.sleep(1.0)
            assert not waiting.done()
            first_writer.close()
            second, _, second_writer = await asyncio.wait_for(waiting, timeout=15)
            assert isinstance(second, InferenceOpened)
            second_writer.close()
            for _ in range(50):  # freeing happens when the server notices the closed stream
                if await _cache_left(node, proc) == CACHE_TOKENS:
                    break
                await asyncio.sleep(0.1)
            assert await _cache_left(node, proc) == CACHE_TOKENS
        finally:
            await node.shutdown()

    asyncio.run(scenario())
    assert proc.alive()


def test_idle_session_hits_the_step_timeout_and_is_freed(server: dict[str, Any]) -> None:
    proc = server["proc"]

    async def scenario() -> None:
        node = await _node(server["peers"])
        try:
            opened, reader, writer = await _open(node, proc, 16, 0)
            assert isinstance(opened, InferenceOpened)
            await write_message(writer, InferenceStep(step_id=1, position=0), [torch.zeros(1, 2, 64)])
            step, _ = await read_message(reader, timeout=10)
            assert isinstance(step, InferenceStepResult) and step.position == 2
            assert await _cache_left(node, proc) == CACHE_TOKENS - 16
            timeout_reply, _ = await read_message(reader, timeout=STEP_TIMEOUT + 10)  # we stay silent
            assert isinstance(timeout_reply, ErrorReply) and timeout_reply.code == "timeout"
            writer.close()
            assert await _cache_left(node, proc) == CACHE_TOKENS
        finally:
            await node.shutdown()

    asyncio.run(scenario())
