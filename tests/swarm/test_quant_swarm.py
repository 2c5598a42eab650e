"""Quantized servers in a loopback swarm: an nf4 and an int8 server of the same checkpoint side by side.

Clients pick one with ``allowed_quant``; logits (max |diff| <= 1e-4, fp32 compute) and greedy generation equal
transformers' model loaded with the matching ``BitsAndBytesConfig``; client-owned LoRA gradients through the
nf4 server equal PEFT's on transformers' nf4 model; a failover replacement keeps the quantization requirement.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.swarm.routing import MissingBlocksError

pytestmark = pytest.mark.swarm

LOGITS_ATOL = 1e-4
SERVE = ["--dtype", "float32", "--throughput", "100"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from quant_models import make_quant_model

    path = make_quant_model(tmp_path_factory.mktemp("quant_llama"))
    with LocalSwarm(tmp_path_factory.mktemp("logs")) as swarm:
        swarm.start_bootstrap()
        procs = {
            q: swarm.start_server(
                path, (0, 2), name=f"srv-{q}", wait=False, extra_args=[*SERVE, "--quant", q]
            )
            for q in ("nf4", "int8")
        }
        swarm.wait_ready(list(procs.values()))
        yield {"path": path, "peers": swarm.initial_peers, "swarm": swarm, "procs": procs}


def _client(setup: dict[str, Any], **kwargs: Any) -> Any:
    return AutoDistributedModelForCausalLM.from_pretrained(
        setup["path"], initial_peers=setup["peers"], load_tokenizer=False, **kwargs
    )


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_server_matches_transformers_bnb(setup: dict[str, Any], quant: str) -> None:
    from quant_models import hf_quantized

    hf = hf_quantized(setup["path"], quant)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    with _client(setup, allowed_quant=(quant,)) as model, torch.inference_mode():
        logits = model(input_ids=ids).logits
        with model.inference_session(max_length=24) as session:
            out = model.generate(ids, max_new_tokens=12, eos_token_id=None)
            used = {hop.peer_id for hop in session.remote.hops}
        want_logits = hf(input_ids=ids).logits.float()
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert used == {setup["procs"][quant].peer_id}  # only the server with the required quantization
    torch.testing.assert_close(logits, want_logits, atol=LOGITS_ATOL, rtol=0)
    assert torch.equal(out, want)


def test_status_announces_quantization_and_block_bytes(setup: dict[str, Any]) -> None:
    from potluck.cli.status import gather_status, render_status

    report = gather_status(setup["path"], tuple(setup["peers"]))
    by_peer = {s["peer_id"]: s for s in report["blocks"][0]["servers"]}
    nf4, int8 = (by_peer[setup["procs"][q].peer_id] for q in ("nf4", "int8"))
    assert (nf4["quant"], int8["quant"]) == ("nf4", "int8")
    # one block: 4 attention + 3 MLP projections of 1024x1024, 2 fp32 norms of 1024
    fp32 = (7 * 1024 * 1024 + 2 * 1024) * 4
    assert 0 < nf4["block_bytes"] < int8["block_bytes"] < fp32 / 3
    assert "nf4" in render_status(report)


def test_lora_gradients_through_nf4_match_peft(setup: dict[str, Any]) -> None:
    import peft

    from quant_models import hf_quantized

    targets = ("q_proj", "v_proj", "down_proj")
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    with _client(setup, allowed_quant=("nf4",), lora_rank=4, lora_alpha=8.0, lora_targets=targets) as model:
        with torch.no_grad():  # B starts at zero (PEFT init); non-zero so A's gradient is non-zero too
            for b in model.lora.b.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        a = {t: (w.detach().clone(), w.grad) for t, w in model.lora.a.items()}
        b = {t: (w.detach().clone(), w.grad) for t, w in model.lora.b.items()}

    hf = hf_quantized(setup["path"], "nf4")
    ref = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    )
    layers = ref.base_model.model.model.layers
    paths = {"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj", "down_proj": "mlp.down_proj"}
    with torch.no_grad():
        for t in targets:
            for i, layer in enumerate(layers):
                module = layer.get_submodule(paths[t])
                module.lora_A["default"].weight.copy_(a[t][0][i])
                module.lora_B["default"].weight.copy_(b[t][0][i])
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for t in targets:
        for i, layer in enumerate(layers):
            module = layer.get_submodule(paths[t])
            torch.testing.assert_close(a[t][1][i], module.lora_A["default"].weight.grad, atol=1e-4, rtol=0)
            torch.testing.assert_close(b[t][1][i], module.lora_B["default"].weight.grad, atol=1e-4, rtol=0)
    assert all(g.abs().sum() > 0 for _, g in a.values())


def test_unmet_quant_requirement_names_the_blocks(setup: dict[str, Any]) -> None:
    with (
        _client(setup, allowed_quant=("none",), wait_for_servers=0.5) as model,
        pytest.raises(MissingBlocksError, match="0:2|0-1|0, 1|blocks"),
    ):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_failover_replacement_keeps_the_quant_requirement(setup: dict[str, Any]) -> None:
    """Kill the nf4 server mid-generation: the replacement is another nf4 server, never the int8 one."""
    from quant_models import hf_quantized

    swarm: LocalSwarm = setup["swarm"]
    spare = swarm.start_server(setup["path"], (0, 2), name="srv-nf4-b", extra_args=[*SERVE, "--quant", "nf4"])
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(9))
    with _client(setup, allowed_quant=("nf4",)) as model, torch.inference_mode():
        with model.inference_session(max_length=20) as session:
            first = model.generate(ids, max_new_tokens=4, eos_token_id=None)
            victim = session.remote.hops[0].peer_id
            swarm.kill(next(p for p in (setup["procs"]["nf4"], spare) if p.peer_id == victim))
            out = model.generate(None, max_new_tokens=8, eos_token_id=None)
            used = session.remote.hops[0].peer_id
            assert session.remote.failovers >= 1
        want = hf_quantized(setup["path"], "nf4").generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert used != victim and used != setup["procs"]["int8"].peer_id
    assert torch.equal(out, want) and torch.equal(first, want[:, :10])


def test_prompt_tuning_gradients_through_int8_match_transformers(setup: dict[str, Any]) -> None:
    import torch.nn.functional as F

    from quant_models import hf_quantized

    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(11))
    with _client(setup, allowed_quant=("int8",), tuning_mode="ptune", pre_seq_len=3) as model:
        with torch.no_grad():
            model.prompts.prompt_embeddings.normal_(0, 0.5, generator=torch.Generator().manual_seed(12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        prefix = model.prompts.prompt_embeddings.detach().clone().requires_grad_(True)
        grad = model.prompts.prompt_embeddings.grad
    hf = hf_quantized(setup["path"], "int8")
    embeds = torch.cat([prefix.unsqueeze(0).expand(2, -1, -1), hf.get_input_embeddings()(ids)], dim=1)
    logits = hf(inputs_embeds=embeds).logits[:, 3:]  # [2, 10, V]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, prefix.grad, atol=1e-4, rtol=0)
