"""A lying server (test-only noise on its outputs) is caught by the client's spot checks, banned, and the
generation rolls back and replays through honest servers, so the tokens equal transformers'."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.client.failures import failure_from_exception
from potluck.server.server import TEST_LIE_ENV

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
NEW_TOKENS = 100
NOISE = 0.05


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three servers of all 8 blocks; one adds Gaussian noise (std 0.05) to every output it returns."""
    path = tiny_model_dir(KIND)
    with LocalSwarm(tmp_path_factory.mktemp("verify-logs")) as s:
        s.start_bootstrap()
        procs = [s.start_server(path, (0, 8), name=f"honest{i}", wait=False) for i in range(2)]
        liar = s.start_server(path, (0, 8), name="liar", wait=False, env={TEST_LIE_ENV: str(NOISE)})
        s.wait_ready([*procs, liar])
        yield {"path": path, "peers": s.initial_peers, "liar": liar.peer_id}


def _client(swarm: dict[str, Any], **kwargs: Any) -> Any:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        swarm["path"], initial_peers=swarm["peers"], load_tokenizer=False, **kwargs
    )
    # This client has "measured" the liar as by far the fastest server, so routing sends every step through it.
    model.view.observed_rps[swarm["liar"]] = 1e9
    return model


def _expected(swarm: dict[str, Any], prompt: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(swarm["path"], torch_dtype=torch.float32).eval()
    return hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)  # type: ignore[no-any-return]


PROMPT = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(5))


def test_the_liar_really_lies_without_verification(swarm: dict[str, Any]) -> None:
    with (
        _client(swarm, verify_fraction=0.0) as model,
        model.inference_session(max_length=NEW_TOKENS + 8) as s,
    ):
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        assert [h.peer_id for h in s.remote.hops] == [swarm["liar"]]
    assert not torch.equal(out, _expected(swarm, PROMPT))  # its noise changes the greedy tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_liar_is_caught_within_100_steps_at_the_default_fraction_and_tokens_stay_exact(
    swarm: dict[str, Any], seed: int
) -> None:
    with _client(swarm, verify_seed=seed) as model:
        assert model.client_config.verify_fraction == 0.05  # the default
        with model.inference_session(max_length=NEW_TOKENS + 8) as session:
            out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
            verifier = session.remote.verifier
            assert verifier.caught == [swarm["liar"]]
            assert verifier.caught_at_step is not None and verifier.caught_at_step <= NEW_TOKENS
            assert swarm["liar"] in model.view.suspects and swarm["liar"] in model.view.excluded()
            assert swarm["liar"] not in [h.peer_id for h in session.remote.hops]
        print(f"seed {seed}: caught at step {verifier.caught_at_step} after {verifier.checks} checks")
    assert torch.equal(out, _expected(swarm, PROMPT))


def test_full_redundancy_catches_the_liar_on_the_first_step(swarm: dict[str, Any]) -> None:
    with (
        _client(swarm, verify_fraction=1.0) as model,
        model.inference_session(max_length=NEW_TOKENS + 8) as s,
    ):
        out = model.generate(PROMPT, max_new_tokens=20, eos_token_id=None)
        assert s.remote.verifier.caught_at_step == 1
        assert s.remote.verifier.checks >= 20  # every step was re-run once the route was honest
    assert torch.equal(out, _expected(swarm, PROMPT)[:, : PROMPT.shape[1] + 20])


def test_a_checker_that_fails_is_handled_by_the_failure_policy_not_called_a_liar(
    swarm: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first re-run's connection is reset: that checker is banned by the failure policy (a short ban here),
    never marked suspect, the check goes on with another holder, and the liar is still caught."""
    banned: list[tuple[str, str]] = []
    with (
        _client(swarm, verify_fraction=1.0, ban_base=0.2) as model,
        model.inference_session(max_length=NEW_TOKENS + 8) as s,
    ):
        verifier = s.remote.verifier
        real_forward, real_ban = verifier.blocks.forward_hop, model.view.ban
        failed: list[str] = []

        async def reset_once(hop: Any, *args: Any, **kwargs: Any) -> Any:
            if not failed and hop.peer_id != swarm["liar"]:
                failed.append(hop.peer_id)
                raise failure_from_exception(
                    hop.peer_id, ConnectionResetError("reset by the test"), "forward"
                )
            return await real_forward(hop, *args, **kwargs)

        def ban(peer_id: str, reason: str) -> float:
            banned.append((peer_id, reason))
            return real_ban(peer_id, reason)  # type: ignore[no-any-return]

        monkeypatch.setattr(verifier.blocks, "forward_hop", reset_once)
        monkeypatch.setattr(model.view, "ban", ban)
        out = model.generate(PROMPT, max_new_tokens=20, eos_token_id=None)
        assert (
            len(failed) == 1
            and (failed[0], banned[0][1]) == banned[0]
            and "reset by the test" in banned[0][1]
        )
        assert failed[0] not in model.view.suspects and failed[0] not in verifier.caught
        assert verifier.caught == [swarm["liar"]]
    assert torch.equal(out, _expected(swarm, PROMPT)[:, : PROMPT.shape[1] + 20])
