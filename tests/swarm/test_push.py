"""Server-to-server push through a loopback swarm: exact tokens, fallback to relaying, failover of a killed server.

One swarm for the module: A [0:3], B1 and B2 [3:6] (B2 a standby), C [6:8]; chains are A -> B -> C. The test that
kills a server runs last.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.client import inference as client_inference
from potluck.client import push as client_push
from potluck.wire import InferenceStep, PushTarget

pytestmark = [pytest.mark.swarm]

KIND = "llama-gqa-llama3rope"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path(tiny_model_dir: Any) -> str:
    return str(tiny_model_dir(KIND))


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def expected(model_path: str, prompt: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def swarm(
    tmp_path_factory: pytest.TempPathFactory, model_path: str
) -> Iterator[tuple[LocalSwarm, list[SwarmProcess]]]:
    with LocalSwarm(tmp_path_factory.mktemp("push-logs")) as s:
        s.start_bootstrap()
        procs = [s.start_server(model_path, span, wait=False) for span in [(0, 3), (3, 6), (3, 6), (6, 8)]]
        s.wait_ready(procs)
        yield s, procs


def _client(swarm: LocalSwarm, model_path: str, **kwargs: Any) -> Any:
    return AutoDistributedModelForCausalLM.from_pretrained(
        model_path,
        initial_peers=swarm.initial_peers,
        load_tokenizer=False,
        step_timeout=10.0,
        wait_for_servers=30.0,
        verify_fraction=0.0,
        **kwargs,
    )


def _record_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, InferenceStep]]:
    """(writer, step) of every inference step the client sends itself, pushed or relayed."""
    sent: list[tuple[Any, InferenceStep]] = []
    for module in (client_push, client_inference):
        original = module.write_message

        async def recording(
            writer: Any, msg: Any, *args: Any, _original: Any = original, **kwargs: Any
        ) -> None:
            if isinstance(msg, InferenceStep):
                sent.append((writer, msg))
            await _original(writer, msg, *args, **kwargs)

        monkeypatch.setattr(module, "write_message", recording)
    return sent


def _starts(sent: list[tuple[Any, InferenceStep]], hops: list[Any]) -> dict[int, set[bool]]:
    """Per hop index, the ``chain_start`` values of the steps the client sent it."""
    index = {id(h.writer): i for i, h in enumerate(hops)}
    starts: dict[int, set[bool]] = {}
    for writer, step in sent:
        starts.setdefault(index[id(writer)], set()).add(step.chain_start)
    return starts


def test_pushed_greedy_generation_equals_transformers(
    swarm, model_path, prompt, expected, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    local, _ = swarm
    sent = _record_steps(monkeypatch)
    with _client(local, model_path) as model, model.inference_session(max_length=64) as session:
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        remote = session.remote
        assert len(remote.hops) == 3
        assert remote.pushed_steps == NEW_TOKENS  # the prefill and every decode step went by push
        assert not any(h.push_off for h in remote.hops) and remote.failovers == 0
        # only the first server hears from us, and it is told that it starts the chain (it gathers batches)
        assert _starts(sent, remote.hops) == {0: {True}}
    assert torch.equal(out, expected)


def test_server_that_cannot_reach_or_is_refused_by_the_next_falls_back(  # type: ignore[no-untyped-def]
    swarm, model_path, prompt, expected, monkeypatch
) -> None:
    """The client names, for A, the right B with a wrong token (B refuses the push), and for B an unreachable
    next hop (the bootstrap peer, which serves no push protocol): both report it and the client relays."""
    local, _ = swarm
    bootstrap_peer = local.initial_peers[0].rsplit("/", 1)[1]
    targets: list[str] = []

    def sabotaged(*, peer_id: str, session_id: str, token: str) -> PushTarget:
        targets.append(peer_id)
        if len(targets) == 1:  # the first link configured is B -> C (receivers first): unreachable next hop
            return PushTarget(peer_id=bootstrap_peer, session_id=session_id, token=token)
        return PushTarget(peer_id=peer_id, session_id=session_id, token="0" * 32)  # A -> B: a wrong token

    monkeypatch.setattr(client_push, "PushTarget", sabotaged)
    with _client(local, model_path) as model, model.inference_session(max_length=64) as session:
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        remote = session.remote
        assert len(targets) == 2
        assert [h.push_off for h in remote.hops] == [True, True, False]  # both links now relay
        assert remote.failovers == 0  # not a failure of any server: nobody was banned or replaced
    assert torch.equal(out, expected)


def test_push_off_in_the_client_relays_every_hop(swarm, model_path, prompt, expected, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    local, _ = swarm
    sent = _record_steps(monkeypatch)
    with _client(local, model_path, push=False) as model, model.inference_session(max_length=64) as session:
        out = model.generate(prompt, max_new_tokens=4, eos_token_id=None)
        assert session.remote.pushed_steps == 0
        assert _starts(sent, session.remote.hops) == {0: {True}, 1: {False}, 2: {False}}
    assert torch.equal(out, expected[:, : prompt.shape[1] + 4])


def test_sigkill_of_the_middle_server_during_a_pushed_generation(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    local, procs = swarm
    with _client(local, model_path) as model, model.inference_session(max_length=64) as session:
        middle = session.remote.hops[1].peer_id
        victim = next(p for p in procs if p.peer_id == middle)
        killed = threading.Event()

        class KillAt:
            seen = -1  # the prompt is put first

            def put(self, value: Any) -> None:
                self.seen += 1
                if self.seen == 8:
                    local.kill(victim)
                    killed.set()

            def end(self) -> None:
                pass

        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, streamer=KillAt())
        remote = session.remote
        assert killed.is_set() and remote.failovers == 1
        assert middle not in [h.peer_id for h in remote.hops]
        assert remote.pushed_steps >= NEW_TOKENS - 2  # push resumed through the replacement
    assert torch.equal(out, expected)
