"""Chaos: servers are killed, frozen or drained mid-generation; the tokens stay exactly those of transformers."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.swarm.routing import MissingBlocksError

pytestmark = [pytest.mark.swarm, pytest.mark.chaos]

KIND = "llama-gqa-llama3rope"
NEW_TOKENS = 40
FAIL_AT = 10


class AtToken:
    """A streamer that calls ``action`` once, after ``at`` new tokens were produced."""

    def __init__(self, at: int, action: Callable[[], None]):
        self.at, self.action, self.seen = at, action, -1  # -1: the prompt is put first

    def put(self, value: Any) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.action()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_path(tiny_model_dir: Any) -> str:
    return str(tiny_model_dir(KIND))


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def expected(model_path: str, prompt: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture()
def swarm(tmp_path: Any) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path / "logs") as s:
        s.start_bootstrap()
        yield s


def _start(swarm: LocalSwarm, model_path: str, *spans: tuple[int, int]) -> list[SwarmProcess]:
    procs = [
        swarm.start_server(model_path, span, wait=False, extra_args=["--update-period", "2"])
        for span in spans
    ]
    swarm.wait_ready(procs)
    return procs


def _client(swarm: LocalSwarm, model_path: str, **kwargs: Any) -> Any:
    kwargs.setdefault("step_timeout", 10.0)
    kwargs.setdefault("wait_for_servers", 30.0)
    return AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=swarm.initial_peers, load_tokenizer=False, **kwargs
    )


def _hop_server(procs: list[SwarmProcess], session: Any, index: int) -> SwarmProcess:
    peer = session.remote.hops[index].peer_id
    return next(p for p in procs if p.peer_id == peer)


def test_sigkill_mid_generation_with_a_standby_server(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (4, 8), (4, 8))
    with _client(swarm, model_path) as model, model.inference_session(max_length=64) as session:
        victim = _hop_server(procs, session, 1)
        sockets = victim.info["sockets"]  # its p2pd's and its own control socket
        assert len(sockets) == 2 and all(stat.S_ISSOCK(os.lstat(path).st_mode) for path in sockets)
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=AtToken(FAIL_AT, lambda: swarm.kill(victim)),
        )
        assert session.remote.failovers == 1
        assert victim.peer_id not in [h.peer_id for h in session.remote.hops]
    assert torch.equal(out, expected)
    # a killed server cannot remove its sockets from /tmp: the launcher that killed it did
    assert not any(os.path.lexists(path) for path in sockets)


def test_replacement_chain_has_different_boundaries(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 2), (2, 4), (4, 8))
    late: list[SwarmProcess] = []

    def kill_and_replace() -> None:
        late.extend(_start(swarm, model_path, (1, 3), (3, 4)))  # survivors with other boundaries
        swarm.kill(procs[1])  # the only holder of 2:4 as the session was routed

    with _client(swarm, model_path) as model, model.inference_session(max_length=64) as session:
        assert [(h.hop.start, h.hop.end) for h in session.remote.hops] == [(0, 2), (2, 4), (4, 8)]
        out = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, streamer=AtToken(FAIL_AT, kill_and_replace)
        )
        hops = [(h.peer_id, h.hop.start, h.hop.end) for h in session.remote.hops]
    assert torch.equal(out, expected)
    assert (late[0].peer_id, 2, 3) in hops and (late[1].peer_id, 3, 4) in hops


def test_frozen_server_is_detected_by_the_step_timeout(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (4, 8), (4, 8))
    with (
        _client(swarm, model_path, step_timeout=2.0) as model,
        model.inference_session(max_length=64) as session,
    ):
        victim = _hop_server(procs, session, 1)
        t0 = time.monotonic()
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=AtToken(FAIL_AT, lambda: swarm.freeze(victim)),
        )
        elapsed = time.monotonic() - t0
        assert session.remote.failovers == 1
    swarm.thaw(victim)
    assert torch.equal(out, expected)
    assert elapsed < 30


def test_failure_during_prefill(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (0, 4), (4, 8))
    with _client(swarm, model_path) as model, model.inference_session(max_length=64) as session:
        swarm.kill(_hop_server(procs, session, 0))  # the session is open; its very first step (prefill) fails
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        assert session.remote.failovers == 1
    assert torch.equal(out, expected)


def test_graceful_drain_hands_over_to_another_server(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (4, 8), (4, 8))
    codes: list[int] = []
    with _client(swarm, model_path) as model, model.inference_session(max_length=64) as session:
        victim = _hop_server(procs, session, 1)
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=AtToken(FAIL_AT, lambda: codes.append(swarm.stop(victim))),
        )
        assert session.remote.failovers == 1
    assert codes == [0]  # SIGTERM: announced offline, drained, exited cleanly
    assert torch.equal(out, expected)


def test_all_holders_die_and_a_new_server_arrives(swarm, model_path, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (4, 8))
    starter: list[threading.Thread] = []

    def kill_and_restart_later() -> None:
        swarm.kill(procs[1])

        def later() -> None:
            time.sleep(5)
            swarm.start_server(
                model_path, (4, 8), name="newcomer", wait=False, extra_args=["--update-period", "2"]
            )

        starter.append(threading.Thread(target=later))
        starter[0].start()

    with _client(swarm, model_path, wait_for_servers=60.0) as model:
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=AtToken(FAIL_AT, kill_and_restart_later),
        )
    starter[0].join()
    assert torch.equal(out, expected)


def test_all_holders_die_and_none_returns(swarm, model_path, prompt) -> None:  # type: ignore[no-untyped-def]
    procs = _start(swarm, model_path, (0, 4), (4, 8))
    wait = 3.0
    killed_at: list[float] = []

    def kill() -> None:
        swarm.kill(procs[1])
        killed_at.append(time.monotonic())

    with _client(swarm, model_path, wait_for_servers=wait) as model:
        with pytest.raises(MissingBlocksError, match=r"blocks 4-7"):
            model.generate(
                prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, streamer=AtToken(FAIL_AT, kill)
            )
        waited = time.monotonic() - killed_at[0]
    assert wait <= waited < wait + 10  # the configured wait, plus a DHT refresh or two


def test_server_killed_between_forward_and_backward(swarm, model_path) -> None:  # type: ignore[no-untyped-def]
    from potluck.models import LocalCausalLM

    procs = _start(swarm, model_path, (0, 4), (4, 8), (4, 8))
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(7))
    with _client(swarm, model_path, tuning_mode="deep_ptune", pre_seq_len=3) as model:
        with torch.no_grad():
            model.prompts.intermediate_prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(8))
        used: list[str] = []
        forward_hop = model.blocks.forward_hop

        async def recording_forward_hop(hop: Any, hidden: torch.Tensor, tuning: Any, **kw: Any) -> Any:
            used.append(hop.peer_id)
            return await forward_hop(hop, hidden, tuning, **kw)

        model.blocks.forward_hop = recording_forward_hop  # type: ignore[method-assign]
        loss = model(input_ids=ids, labels=ids).loss
        victim = next(p for p in procs[1:] if p.peer_id in used)
        swarm.kill(victim)  # its forward ran; its backward must go to the standby
        loss.backward()
        grads = [model.prompts.prompt_embeddings.grad, model.prompts.intermediate_prompts.grad]
        prefix = model.prompts.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = model.prompts.intermediate_prompts.detach().clone().requires_grad_(True)
        assert used.count(victim.peer_id) == 1 and len(used) > 2  # the forward was re-run on the replacement
    local = LocalCausalLM.from_pretrained(model_path)
    local.requires_grad_(False)
    embeds = torch.cat([prefix.unsqueeze(0).expand(2, -1, -1), local.client.embed(ids)], dim=1)
    logits = local.client.head(local.span(local.client.pre_blocks(embeds), prompts=deep.unsqueeze(1))[:, 3:])
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], prefix.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(grads[1], deep.grad, atol=1e-4, rtol=0)
