"""A loopback swarm of real server processes: exactness against transformers, concurrency, status, bad requests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.swarm.routing import MissingBlocksError

pytestmark = pytest.mark.swarm

KINDS = ("llama-gqa-llama3rope", "bloom")
SPLIT = 3  # server A holds blocks 0:3, server B 3:8


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One bootstrap and two servers per model (0:SPLIT and SPLIT:8), all started in parallel."""
    paths = {kind: tiny_model_dir(kind) for kind in KINDS}
    with LocalSwarm(tmp_path_factory.mktemp("swarm-logs")) as s:
        s.start_bootstrap()
        procs = []
        for kind, path in paths.items():
            procs.append(s.start_server(path, (0, SPLIT), name=f"{kind}-a", wait=False))
            procs.append(s.start_server(path, (SPLIT, 8), name=f"{kind}-b", wait=False))
        s.wait_ready(procs)
        yield {"swarm": s, "paths": paths, "peers": s.initial_peers}


def _client(swarm: dict[str, Any], kind: str, **kwargs: Any) -> Any:
    return AutoDistributedModelForCausalLM.from_pretrained(
        swarm["paths"][kind], initial_peers=swarm["peers"], load_tokenizer=False, **kwargs
    )


def _hf(path: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _prompt(seed: int, batch: int = 1, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers(swarm: dict[str, Any], kind: str) -> None:
    prompt = _prompt(0)
    expected = _hf(swarm["paths"][kind]).generate(
        prompt, max_new_tokens=32, do_sample=False, eos_token_id=None
    )
    with _client(swarm, kind) as model:
        out = model.generate(prompt, max_new_tokens=32, eos_token_id=None)
    assert out.shape == (1, prompt.shape[1] + 32)
    assert torch.equal(out, expected)


def test_seeded_sampling_equals_local_sampling(swarm: dict[str, Any]) -> None:
    kind = KINDS[0]
    prompt = _prompt(1)
    sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(123)
    expected = _hf(swarm["paths"][kind]).generate(prompt, max_new_tokens=24, eos_token_id=None, **sampling)
    with _client(swarm, kind) as model:
        torch.manual_seed(123)
        out = model.generate(prompt, max_new_tokens=24, eos_token_id=None, **sampling)
    assert torch.equal(out, expected)


def test_session_spans_several_generate_calls(swarm: dict[str, Any]) -> None:
    kind = KINDS[0]
    prompt = _prompt(2)
    expected = _hf(swarm["paths"][kind]).generate(
        prompt, max_new_tokens=16, do_sample=False, eos_token_id=None
    )
    with _client(swarm, kind) as model, model.inference_session(max_length=64) as session:
        first = model.generate(prompt, max_new_tokens=8, eos_token_id=None)
        second = model.generate(None, max_new_tokens=8, eos_token_id=None)
        assert session.position == prompt.shape[1] + 15  # the last token is returned, not yet fed
    assert torch.equal(first, expected[:, : prompt.shape[1] + 8])
    assert torch.equal(second, expected)


def test_three_concurrent_clients(swarm: dict[str, Any]) -> None:
    results: dict[tuple[str, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    jobs = [(KINDS[0], 10), (KINDS[1], 11), (KINDS[0], 12)]

    def run(kind: str, seed: int) -> None:
        try:
            with _client(swarm, kind) as model:
                results[(kind, seed)] = model.generate(_prompt(seed), max_new_tokens=20, eos_token_id=None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for kind, seed in jobs:
        expected = _hf(swarm["paths"][kind]).generate(
            _prompt(seed), max_new_tokens=20, do_sample=False, eos_token_id=None
        )
        assert torch.equal(results[(kind, seed)], expected), (kind, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_loss_and_input_gradient_match_transformers(swarm: dict[str, Any], kind: str) -> None:
    hf = _hf(swarm["paths"][kind])
    ids = _prompt(3, batch=2, length=16)
    embeds = hf.get_input_embeddings()(ids).detach()
    ref_embeds = embeds.clone().requires_grad_(True)
    ref = hf(inputs_embeds=ref_embeds, labels=ids)
    ref.loss.backward()
    with _client(swarm, kind) as model:
        ours_embeds = embeds.clone().requires_grad_(True)
        out = model(inputs_embeds=ours_embeds, labels=ids)
        out.loss.backward()
        by_ids = model(input_ids=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(by_ids.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert ours_embeds.grad is not None and ref_embeds.grad is not None
    torch.testing.assert_close(ours_embeds.grad, ref_embeds.grad, atol=1e-4, rtol=0)


def test_status_json_reports_coverage(swarm: dict[str, Any]) -> None:
    path = swarm["paths"][KINDS[0]]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "potluck.cli.main",
            "status",
            path,
            "--initial-peers",
            *swarm["peers"],
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["missing_blocks"] == []
    assert [b["index"] for b in report["blocks"]] == list(range(8))
    for block in report["blocks"]:
        spans = [s["span"] for s in block["servers"] if s["state"] == "online"]
        assert spans == [[0, SPLIT]] if block["index"] < SPLIT else spans == [[SPLIT, 8]]
        assert all(s["peer_id"] and s["cache_tokens_left"] > 0 for s in block["servers"])


def test_missing_blocks_is_a_clear_error(swarm: dict[str, Any]) -> None:
    with (
        pytest.raises(MissingBlocksError, match=r"blocks 0-7"),
        _client(swarm, KINDS[0], model_prefix="nobody-serves-this", wait_for_servers=1.0) as model,
    ):
        model.generate(_prompt(4), max_new_tokens=2)


def test_server_survives_bad_requests(swarm: dict[str, Any]) -> None:
    """Garbage, wrong shapes, unknown models and impossible positions get an error reply; the server lives on."""
    from potluck.swarm.records import model_prefix_for
    from potluck.swarm.transport import NodeOptions, SwarmNode
    from potluck.wire import (
        ErrorReply,
        InferenceStep,
        InfoRequest,
        OpenInference,
        read_message,
        write_message,
    )
    from potluck.wire.protocols import PROTOCOL_INFERENCE, PROTOCOL_INFO

    path = swarm["paths"][KINDS[0]]
    prefix = model_prefix_for(path)
    server = next(p for p in swarm["swarm"].processes if p.name == f"{KINDS[0]}-a")

    async def scenario() -> list[str]:
        node = await SwarmNode.create(
            NodeOptions(initial_peers=tuple(swarm["peers"]), host="127.0.0.1", client_mode=True)
        )
        codes: list[str] = []
        try:

            async def exchange(protocol: str, payload: bytes | None, *messages: Any) -> Any:
                reader, writer = await node.open_stream(server.peer_id, protocol)
                if payload is not None:
                    writer.write(payload)
                    await writer.drain()
                reply = None
                for msg, tensors in messages:
                    await write_message(writer, msg, tensors)
                    reply, _ = await read_message(reader, timeout=30)
                    if isinstance(reply, ErrorReply):
                        break
                if payload is not None:
                    reply, _ = await read_message(reader, timeout=30)
                writer.close()
                return reply

            opened = OpenInference(model=prefix, start=0, end=SPLIT, max_length=16, batch_size=1)
            good = torch.zeros(1, 1, 64)
            cases = [
                (PROTOCOL_INFERENCE, b"\x00garbage bytes that are not a frame" * 3, ()),
                (PROTOCOL_INFO, b"PLK1\xff\xff\xff\xff", ()),
                (
                    PROTOCOL_INFERENCE,
                    None,
                    ((OpenInference(model="other", start=0, end=1, max_length=8, batch_size=1), []),),
                ),
                (PROTOCOL_INFERENCE, None, ((opened.model_copy(update={"end": 8}), []),)),
                (PROTOCOL_INFERENCE, None, ((opened.model_copy(update={"max_length": 10**9}), []),)),
                (
                    PROTOCOL_INFERENCE,
                    None,
                    ((opened, []), (InferenceStep(step_id=1, position=0), [torch.zeros(1, 1, 65)])),
                ),
                (
                    PROTOCOL_INFERENCE,
                    None,
                    ((opened, []), (InferenceStep(step_id=1, position=0), [torch.zeros(2, 1, 64)])),
                ),
                (PROTOCOL_INFERENCE, None, ((opened, []), (InferenceStep(step_id=1, position=5), [good]))),
                (
                    PROTOCOL_INFERENCE,
                    None,
                    ((opened, []), (InferenceStep(step_id=1, position=0), [torch.zeros(1, 17, 64)])),
                ),
                (
                    PROTOCOL_INFERENCE,
                    None,
                    ((opened, []), (InferenceStep(step_id=1, position=0), [good.long()])),
                ),
                (PROTOCOL_INFERENCE, None, ((opened, []), (InfoRequest(), []))),
            ]
            for protocol, payload, messages in cases:
                reply = await exchange(protocol, payload, *messages)
                assert isinstance(reply, ErrorReply), (protocol, payload, messages, reply)
                codes.append(reply.code)
            info = await exchange(PROTOCOL_INFO, None, (InfoRequest(), []))
            assert info.kind == "info_response" and info.start == 0 and info.end == SPLIT
        finally:
            await node.shutdown()
        return codes

    codes = asyncio.run(scenario())
    assert codes[:5] == ["bad_request", "bad_request", "unknown_model", "wrong_span", "limit_exceeded"]
    assert set(codes[5:]) == {"bad_request"}
    assert server.alive()
    with _client(swarm, KINDS[0]) as model:  # and it still serves correct results
        expected = _hf(swarm["paths"][KINDS[0]]).generate(
            _prompt(5), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        assert torch.equal(model.generate(_prompt(5), max_new_tokens=8, eos_token_id=None), expected)


def test_direct_data_path_is_used_checked_and_optional(swarm: dict[str, Any]) -> None:
    """Servers announce a direct TCP path; clients use it, refuse a wrong peer, and fall back to libp2p."""
    import socket

    from potluck.swarm.direct import DirectConnectError, open_direct
    from potluck.swarm.signing import IdentityKey

    kind = KINDS[0]
    expected = _hf(swarm["paths"][kind]).generate(
        _prompt(8), max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    for use_direct in (True, False):
        with _client(swarm, kind, use_direct=use_direct) as model:
            records = [s.record for s in model.view.snapshot.servers.values()]
            assert records and all(r.direct_addrs for r in records)
            with model.inference_session(max_length=32) as session:
                out = model.generate(_prompt(8), max_new_tokens=6, eos_token_id=None)
                sockets = [h.writer.get_extra_info("socket") for h in session.remote.hops]
            assert torch.equal(out, expected)
            # A direct connection is a TCP socket to the server; a libp2p stream is a Unix socket to our p2pd.
            families = {s.family for s in sockets}
            assert families == ({socket.AF_INET} if use_direct else {socket.AF_UNIX})

    server = next(p for p in swarm["swarm"].processes if p.name == f"{kind}-a")
    with _client(swarm, kind) as model:
        addr = model.view.snapshot.servers[server.peer_id].record.direct_addrs[0]
    other = next(p for p in swarm["swarm"].processes if p.name == f"{kind}-b")

    async def probe() -> None:
        with pytest.raises(DirectConnectError, match="not"):
            # a stale address is refused
            await open_direct(addr, "potluck.info", other.peer_id, timeout=5, identity=IdentityKey.generate())
        host, _, port = addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"garbage that is not a hello" * 10)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=15) == b""  # dropped, nothing else happens
        writer.close()

    asyncio.run(probe())
    assert server.alive()


def test_backward_uses_the_graph_kept_by_forward(swarm: dict[str, Any]) -> None:
    """With keep_activations, backward runs on the forward's graph (it ignores the resent hidden states);
    an unknown id falls back to recomputing from those hidden states."""
    from potluck.swarm.records import model_prefix_for
    from potluck.swarm.transport import NodeOptions, SwarmNode
    from potluck.wire import BackwardRequest, ForwardRequest, read_message, write_message
    from potluck.wire.protocols import PROTOCOL_BACKWARD, PROTOCOL_FORWARD

    kind = KINDS[0]
    prefix = model_prefix_for(swarm["paths"][kind])
    server = next(p for p in swarm["swarm"].processes if p.name == f"{kind}-a")
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))

    async def call(node: SwarmNode, protocol: str, msg: Any, tensors: list[torch.Tensor]) -> Any:
        reader, writer = await node.open_stream(server.peer_id, protocol)
        await write_message(writer, msg, tensors)
        reply = await read_message(reader, timeout=30)
        writer.close()
        return reply

    async def scenario() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        node = await SwarmNode.create(
            NodeOptions(initial_peers=tuple(swarm["peers"]), host="127.0.0.1", client_mode=True)
        )
        try:
            fwd = ForwardRequest(model=prefix, start=0, end=SPLIT, keep_activations=True)
            result, _ = await call(node, PROTOCOL_FORWARD, fwd, [hidden])
            assert result.activation_id
            bwd = BackwardRequest(model=prefix, start=0, end=SPLIT, activation_id=result.activation_id)
            _, (kept_grad,) = await call(node, PROTOCOL_BACKWARD, bwd, [torch.zeros_like(hidden), grad_out])
            _, (true_grad,) = await call(
                node, PROTOCOL_BACKWARD, bwd, [hidden, grad_out]
            )  # id used up: recompute
            _, (zero_grad,) = await call(node, PROTOCOL_BACKWARD, bwd, [torch.zeros_like(hidden), grad_out])
            return kept_grad, true_grad, zero_grad
        finally:
            await node.shutdown()

    kept_grad, true_grad, zero_grad = asyncio.run(scenario())
    torch.testing.assert_close(kept_grad, true_grad, atol=1e-5, rtol=0)
    assert not torch.allclose(zero_grad, true_grad, atol=1e-3)


@pytest.mark.parametrize("compression", ["fp16", "bf16", "int8"])
def test_compressed_activations_stay_close(swarm: dict[str, Any], compression: str) -> None:
    kind = KINDS[0]
    ids = _prompt(9, batch=2, length=12)
    ref = _hf(swarm["paths"][kind])(input_ids=ids).logits
    with _client(swarm, kind, compression=compression) as model:
        logits = model(input_ids=ids).logits
        out = model.generate(ids[:1], max_new_tokens=4, eos_token_id=None)
    tolerance = {"fp16": 2e-3, "bf16": 3e-2, "int8": 5e-2}[compression]
    assert (logits - ref).abs().max() < tolerance * ref.abs().max()
    assert out.shape == (1, 16)
