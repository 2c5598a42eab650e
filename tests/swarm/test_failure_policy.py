"""The failure policy on a loopback swarm of real servers: deterministic errors are raised at once and ban
nobody, requests are routed only to servers that can serve them, and a client with another checkpoint under
the same name is refused with both fingerprints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from potluck import (
    AutoDistributedModelForCausalLM,
    BadRequestError,
    LimitExceededError,
    ModelMismatchError,
    UnknownAdapterError,
)
from potluck.cli.local_swarm import LocalSwarm
from potluck.models import LocalCausalLM, LoraConfig, LoraWeights, save_peft_adapter
from potluck.models.fingerprint import checkpoint_fingerprint
from potluck.swarm.records import model_prefix_for
from potluck.swarm.routing import MissingBlocksError, RouteRequirements, find_inference_route
from tiny_models import make_tiny_model

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
ADAPTER = "policy-adapter"
MAX_INFERENCE_LENGTH = 96  # both servers: a session longer than this fits nowhere


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two servers holding all 8 blocks of the same checkpoint; only the first preloads an adapter."""
    path = tiny_model_dir(KIND)
    local = LocalCausalLM.from_pretrained(path)
    adapter_dir = tmp_path_factory.mktemp("adapters") / ADAPTER
    config = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    adapter = LoraWeights.init_random(
        local.spec, config, 0, local.spec.num_blocks, generator=torch.Generator().manual_seed(1)
    )
    save_peft_adapter(str(adapter_dir), adapter, local.spec, base_model_name_or_path=path)
    limits = ["--max-inference-length", str(MAX_INFERENCE_LENGTH)]
    with LocalSwarm(tmp_path_factory.mktemp("logs")) as swarm:
        swarm.start_bootstrap()
        with_adapter = swarm.start_server(
            path,
            (0, 8),
            name="with-adapter",
            wait=False,
            extra_args=[*limits, "--adapters", str(adapter_dir)],
        )
        plain = swarm.start_server(path, (0, 8), name="plain", wait=False, extra_args=limits)
        swarm.wait_ready([with_adapter, plain])
        yield {"path": path, "peers": swarm.initial_peers, "with_adapter": with_adapter, "plain": plain}


def _client(setup: dict[str, Any], path: str | None = None, **kwargs: Any) -> Any:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path or setup["path"], initial_peers=setup["peers"], load_tokenizer=False, **kwargs
    )
    model.opened_streams = []  # every request to a server opens one stream: count round trips
    open_stream = model.view.open_stream

    async def counting_open_stream(peer_id: str, protocol: str, *, timeout: float) -> Any:
        model.opened_streams.append((peer_id, protocol))
        return await open_stream(peer_id, protocol, timeout=timeout)

    model.view.open_stream = counting_open_stream
    return model


def _ids(seed: int = 0, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_bad_request_reaches_the_caller_in_one_round_trip_and_bans_nobody(setup: dict[str, Any]) -> None:
    with _client(setup, tuning_mode="deep_ptune", pre_seq_len=3, wait_for_servers=30.0) as model:
        # deep prompts of the wrong hidden size: every server refuses them (bad_request), so retrying is useless
        model.prompts.intermediate_prompts = nn.Parameter(torch.zeros(8, 3, 65))
        with pytest.raises(BadRequestError, match=r"prompts must be \[.*64\], got \[.*65\]") as exc:
            model(input_ids=_ids(1), labels=_ids(1))
        assert exc.value.code == "bad_request" and exc.value.peer_id in (
            setup["with_adapter"].peer_id,
            setup["plain"].peer_id,
        )
        assert len(model.opened_streams) == 1 and model.opened_streams[0][1] == "potluck.forward"
        assert model.view.bans == {}

        model.opened_streams.clear()
        with pytest.raises(BadRequestError, match="prompts must be"):
            model.generate(_ids(2), max_new_tokens=3)  # the session's opening is refused the same way
        assert len(model.opened_streams) == 1 and model.opened_streams[0][1] == "potluck.inference"
        assert model.view.bans == {}


def test_a_limit_no_server_offers_fails_without_a_round_trip(setup: dict[str, Any]) -> None:
    with _client(setup, wait_for_servers=30.0) as model:
        with pytest.raises(LimitExceededError, match=f"max_inference_length {MAX_INFERENCE_LENGTH}"):
            model.generate(_ids(3), max_new_tokens=MAX_INFERENCE_LENGTH)  # 6 + 96 tokens > 96
        assert model.opened_streams == [] and model.view.bans == {}
        out = model.generate(_ids(3), max_new_tokens=8, eos_token_id=None)  # within the limit: served
        assert out.shape == (1, 14)


def test_active_adapter_is_routed_only_to_servers_that_hold_it(setup: dict[str, Any]) -> None:
    holder, other = setup["with_adapter"].peer_id, setup["plain"].peer_id
    with _client(setup, active_adapter=ADAPTER) as model:
        for seed in range(3):
            with model.inference_session(max_length=16) as session:
                model.generate(_ids(seed), max_new_tokens=2, eos_token_id=None)
                assert [h.peer_id for h in session.remote.hops] == [holder]
            model(input_ids=_ids(seed))
        assert {peer for peer, _ in model.opened_streams} == {holder}
        assert model.view.bans == {}
        # The other server was a real candidate: without the adapter need, and the holder unavailable, it is chosen.
        snapshot = model.view.snapshot
        route = find_inference_route(snapshot, 0, 8, rtts={}, batch_tokens=16, banned={holder})
        assert [h.peer_id for h in route] == [other]
        with pytest.raises(MissingBlocksError):
            find_inference_route(
                snapshot,
                0,
                8,
                rtts={},
                batch_tokens=16,
                banned={holder},
                needs=RouteRequirements(adapter=ADAPTER),
            )
    with _client(setup, active_adapter="not-loaded-anywhere", wait_for_servers=30.0) as model:
        with pytest.raises(UnknownAdapterError, match="'not-loaded-anywhere' not loaded"):
            model(input_ids=_ids(4))
        assert model.opened_streams == [] and model.view.bans == {}


def test_another_checkpoint_under_the_same_name_is_refused_with_both_fingerprints(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    other = make_tiny_model(KIND, tmp_path / "same-config-other-seed", seed=1)  # same config, other weights
    ours, theirs = checkpoint_fingerprint(other), checkpoint_fingerprint(setup["path"])
    assert ours.split(".")[0] == theirs.split(".")[0] and ours != theirs  # same config hash, other weights
    prefix = model_prefix_for(setup["path"])
    with _client(setup, other, model_prefix=prefix, wait_for_servers=30.0) as model:
        assert model.fingerprint == ours
        with pytest.raises(ModelMismatchError) as exc:
            model.generate(_ids(5), max_new_tokens=2)
        message = str(exc.value)
        assert f"server fingerprint {theirs}, client fingerprint {ours}" in message
        assert setup["with_adapter"].peer_id in message and setup["plain"].peer_id in message
        with pytest.raises(ModelMismatchError, match=ours):
            model(input_ids=_ids(5))
        assert model.opened_streams == [] and model.view.bans == {}


def _char_tokenizer() -> Any:
    # token i is one character ("a".."z", then other code points); no hub access needed
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i) if i < 26 else chr(0x100 + i): i for i in range(256)}
    backend = Tokenizer(WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="a")


def test_hf_surface_tokenizer_stop_strings_device_backward_and_saved_prompts(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(setup["path"], dtype=torch.float32).eval()
    tokenizer = _char_tokenizer()
    ids = _ids(7)
    free = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, ids.shape[1] :].tolist()
    k = next(i for i in range(2, 12) if free[i] not in free[:i])
    stop = tokenizer.decode([free[k]])
    expected = hf.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer
    )
    assert expected.shape[1] == ids.shape[1] + k + 1  # the stop string really cut the generation short
    with _client(setup) as model:
        assert model.device == torch.device("cpu")
        got = model.generate(
            ids, max_new_tokens=12, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer
        )
        assert torch.equal(got, expected)

        # No tuning mode: unfreezing the client's parts makes loss.backward() reach them through the swarm.
        model.client.requires_grad_(True)
        batch = _ids(8, length=10)
        model(input_ids=batch, labels=batch).loss.backward()
        hf.requires_grad_(False)
        hf.model.embed_tokens.weight.requires_grad_(True)
        hf(input_ids=batch, labels=batch).loss.backward()
        grad = model.client.embed_tokens.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, hf.model.embed_tokens.weight.grad, atol=1e-4, rtol=0)

    with _client(setup, tuning_mode="deep_ptune", pre_seq_len=2) as model:
        with torch.no_grad():
            for p in model.prompts.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
        model.prompts.save_pretrained(str(tmp_path / "prompts"))
        trained = model(input_ids=ids).logits
    with _client(setup, tuning_mode="deep_ptune", pre_seq_len=2) as model:
        assert not torch.allclose(model(input_ids=ids).logits, trained, atol=1e-4)
        model.prompts.load_pretrained(str(tmp_path / "prompts"))
        torch.testing.assert_close(model(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
    with (
        _client(setup, tuning_mode="ptune", pre_seq_len=2) as model,
        pytest.raises(ValueError, match="use the same tuning_mode"),
    ):
        model.prompts.load_pretrained(str(tmp_path / "prompts"))
