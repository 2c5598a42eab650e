"""Fair shares: one client holding the longest sessions it may cannot stop another client from generating."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.swarm.transport import NodeOptions, SwarmNode
from potluck.wire import (
    ErrorReply,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    OpenInference,
    read_message,
    write_message,
)
from potluck.wire.protocols import PROTOCOL_INFERENCE

pytestmark = pytest.mark.swarm

MAX_LENGTH = 48  # the server's max_inference_length: the hog asks for the longest sessions allowed
CACHE_TOKENS = 2 * MAX_LENGTH  # two such sessions would take the whole budget
PEER_SESSIONS = 3
EVICT_IDLE_AFTER = 1.0  # seconds without a step after which a session over its client's share may be closed


@pytest.fixture(scope="module")
def server(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tiny_model_dir("llama-gqa-llama3rope")
    with LocalSwarm(tmp_path_factory.mktemp("logs")) as swarm:
        swarm.start_bootstrap()
        args = ["--cache-tokens", str(CACHE_TOKENS), "--max-inference-length", str(MAX_LENGTH),
                "--peer-sessions", str(PEER_SESSIONS), "--model-prefix", "fair",
                "--evict-idle-after", str(EVICT_IDLE_AFTER)]  # fmt: skip
        proc = swarm.start_server(path, (0, 8), extra_args=args)
        yield {"proc": proc, "peers": swarm.initial_peers, "path": path}


async def _open(node: SwarmNode, proc: SwarmProcess, max_length: int) -> tuple[Any, Any, Any]:
    reader, writer = await node.open_stream(proc.peer_id, PROTOCOL_INFERENCE)
    msg = OpenInference(model="fair", start=0, end=8, max_length=max_length, batch_size=1, alloc_timeout=5)
    await write_message(writer, msg)
    reply, _ = await read_message(reader, timeout=30)
    return reply, reader, writer


def test_a_client_holding_max_length_sessions_cannot_stop_another(server: dict[str, Any]) -> None:
    proc = server["proc"]

    async def hog() -> tuple[SwarmNode, list[Any], list[Any]]:
        node = await SwarmNode.create(
            NodeOptions(initial_peers=tuple(server["peers"]), host="127.0.0.1", client_mode=True)
        )
        first, reader, writer = await _open(node, proc, MAX_LENGTH)
        assert isinstance(first, InferenceOpened)
        # keep it alive the way the attack did: one 1-token step now and then
        await write_message(writer, InferenceStep(step_id=1, position=0), [torch.zeros(1, 1, 64)])
        step, _ = await read_message(reader, timeout=30)
        assert isinstance(step, InferenceStepResult)
        second, _, second_writer = await _open(node, proc, MAX_LENGTH)  # past this client's share: refused
        assert isinstance(second, ErrorReply) and second.code == "cache_full" and second.retryable
        assert "per-client bound" in second.message
        return node, [writer, second_writer], [first]

    loop = asyncio.new_event_loop()
    node, writers, _ = loop.run_until_complete(hog())
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            server["path"], initial_peers=server["peers"], model_prefix="fair", load_tokenizer=False,
            wait_for_servers=5.0, alloc_timeout=5.0,
        )  # fmt: skip
        try:
            ids = torch.tensor([[1, 2, 3, 4]])
            out = model.generate(
                ids, max_new_tokens=MAX_LENGTH - 4, eos_token_id=None
            )  # a max-length session
            assert out.shape == (1, MAX_LENGTH)
        finally:
            model.shutdown()

        async def many_sessions() -> None:
            """Small sessions from one peer are capped by count as well (500 of them were accepted before)."""
            other = await SwarmNode.create(
                NodeOptions(initial_peers=tuple(server["peers"]), host="127.0.0.1", client_mode=True)
            )
            try:
                replies = [await _open(other, proc, 1) for _ in range(PEER_SESSIONS + 1)]
                opened = [r for r, _, _ in replies if isinstance(r, InferenceOpened)]
                refused = [r for r, _, _ in replies if isinstance(r, ErrorReply)]
                assert len(opened) == PEER_SESSIONS
                assert len(refused) == 1 and "sessions here, the per-client limit" in refused[0].message
                for _, _, w in replies:
                    w.close()
            finally:
                await other.shutdown()

        loop.run_until_complete(many_sessions())
    finally:
        for w in writers:
            w.close()
        loop.run_until_complete(node.shutdown())
        loop.close()
    assert proc.alive()


def test_idle_sessions_over_a_share_are_closed_for_another_client(server: dict[str, Any]) -> None:
    """Two clients fill the whole budget with idle max-length sessions; a third client still generates: the
    longest-idle session of a client over its fair share (96 // 3) is closed, and its owner is told so."""
    proc = server["proc"]

    async def fill() -> tuple[list[SwarmNode], list[tuple[Any, Any, Any]]]:
        nodes, opened = [], []
        for _ in range(2):
            node = await SwarmNode.create(
                NodeOptions(initial_peers=tuple(server["peers"]), host="127.0.0.1", client_mode=True)
            )
            nodes.append(node)
            opened.append(await _open(node, proc, MAX_LENGTH))
            assert isinstance(opened[-1][0], InferenceOpened)
        return nodes, opened

    loop = asyncio.new_event_loop()
    nodes, opened = loop.run_until_complete(fill())
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            server["path"], initial_peers=server["peers"], model_prefix="fair", load_tokenizer=False,
            wait_for_servers=5.0, alloc_timeout=10.0,
        )  # fmt: skip
        try:
            out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, eos_token_id=None)
            assert out.shape == (1, 12)
        finally:
            model.shutdown()

        async def next_steps() -> list[Any]:
            replies = []
            for _, reader, writer in opened:
                await write_message(writer, InferenceStep(step_id=1, position=0), [torch.zeros(1, 1, 64)])
                replies.append((await read_message(reader, timeout=30))[0])
            return replies

        first, second = loop.run_until_complete(next_steps())
        assert isinstance(first, ErrorReply) and first.code == "evicted" and first.retryable  # longest idle
        assert "fair share" in first.message
        assert isinstance(
            second, InferenceStepResult
        )  # one eviction was enough: the other client keeps its own
    finally:
        for _, _, writer in opened:
            writer.close()
        for node in nodes:
            loop.run_until_complete(node.shutdown())
        loop.close()
    assert proc.alive()
