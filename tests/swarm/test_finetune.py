"""Fine-tuning over a loopback swarm: ptune, deep_ptune and LoRA gradients equal a local computation."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.models import LocalCausalLM, LoraConfig, LoraWeights, save_peft_adapter

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
ADAPTER = "unit-adapter"


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tiny_model_dir(KIND)
    local = LocalCausalLM.from_pretrained(path)
    local.requires_grad_(False)
    adapter_dir = tmp_path_factory.mktemp("adapters") / ADAPTER
    config = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    adapter = LoraWeights.init_random(
        local.spec, config, 0, local.spec.num_blocks, generator=torch.Generator().manual_seed(5)
    )
    save_peft_adapter(str(adapter_dir), adapter, local.spec, base_model_name_or_path=path)
    with LocalSwarm(tmp_path_factory.mktemp("logs")) as swarm:
        swarm.start_bootstrap()
        extra = ["--adapters", str(adapter_dir)]
        procs = [swarm.start_server(path, span, wait=False, extra_args=extra) for span in ((0, 3), (3, 8))]
        swarm.wait_ready(procs)
        yield {"path": path, "peers": swarm.initial_peers, "local": local, "adapter": adapter}


def _local_generate(
    local: LocalCausalLM, prompt: torch.Tensor, new: int, lora: LoraWeights | None = None
) -> torch.Tensor:
    from potluck.client.generation import GenerationParams, generate_tokens

    cache = local.new_cache(prompt.shape[0], prompt.shape[1] + new)
    params = GenerationParams.from_kwargs(None, max_new_tokens=new, eos_token_id=None)
    with torch.inference_mode():
        return generate_tokens(lambda ids: local.step(ids, cache, lora=lora)[:, -1], prompt, params)


def _client(setup: dict[str, Any], **kwargs: Any) -> Any:
    return AutoDistributedModelForCausalLM.from_pretrained(
        setup["path"], initial_peers=setup["peers"], load_tokenizer=False, **kwargs
    )


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(seed))


def _local_loss(
    local: LocalCausalLM, ids: torch.Tensor, prefix: torch.Tensor | None = None, **kw: Any
) -> torch.Tensor:
    embeds = local.client.embed(ids)
    p = 0
    if prefix is not None:
        p = prefix.shape[0]
        embeds = torch.cat([prefix.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    hidden = local.span(local.client.pre_blocks(embeds), **kw)
    logits = local.client.head(hidden[:, p:])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_ptune_gradients_match_local(setup: dict[str, Any]) -> None:
    ids = _batch(1)
    with _client(setup, tuning_mode="ptune", pre_seq_len=4) as model:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        prefix = model.prompts.prompt_embeddings.detach().clone().requires_grad_(True)
        grad = model.prompts.prompt_embeddings.grad
    ref = _local_loss(setup["local"], ids, prefix)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, prefix.grad, atol=1e-4, rtol=0)


def test_deep_ptune_gradients_match_local(setup: dict[str, Any]) -> None:
    ids = _batch(2)
    with _client(setup, tuning_mode="deep_ptune", pre_seq_len=3) as model:
        with torch.no_grad():  # non-zero deep prompts so every block's prompt matters
            model.prompts.intermediate_prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        prefix = model.prompts.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = model.prompts.intermediate_prompts.detach().clone().requires_grad_(True)
        grads = (model.prompts.prompt_embeddings.grad, model.prompts.intermediate_prompts.grad)
    ref = _local_loss(setup["local"], ids, prefix, prompts=deep.unsqueeze(1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], prefix.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(grads[1], deep.grad, atol=1e-4, rtol=0)
    assert deep.grad is not None and deep.grad.abs().sum() > 0


def test_lora_gradients_match_local(setup: dict[str, Any]) -> None:
    ids = _batch(3)
    with _client(setup, lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "down_proj")) as model:
        with (
            torch.no_grad()
        ):  # B starts at zero (PEFT init); make it non-zero so A's gradient is non-zero too
            for b in model.lora.b.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        weights = model.lora.weights()
        ours = [t.grad for t in weights.tensors()]
        ref_weights = weights.detach()
        ref_tensors = [t.clone().requires_grad_(True) for t in ref_weights.tensors()]
    ref_lora = LoraWeights.from_tensors(ref_weights.config, 0, ref_weights.end, ref_tensors)
    ref = _local_loss(setup["local"], ids, lora=ref_lora)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    for got, want in zip(ours, ref_tensors, strict=True):
        torch.testing.assert_close(got, want.grad, atol=1e-4, rtol=0)


def test_client_lora_generation_matches_local(setup: dict[str, Any]) -> None:
    prompt = _batch(4)[:1, :6]
    with _client(setup, lora_rank=4, lora_alpha=8.0) as model:
        with torch.no_grad():
            for b in model.lora.b.values():
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
        out = model.generate(prompt, max_new_tokens=12, eos_token_id=None)
        weights = model.lora.weights().detach()
    expected = _local_generate(setup["local"], prompt, 12, weights)
    assert torch.equal(out, expected)


def test_server_preloaded_adapter_is_selected_by_name(setup: dict[str, Any]) -> None:
    prompt = _batch(5)[:1, :6]
    with _client(setup, active_adapter=ADAPTER) as model:
        out = model.generate(prompt, max_new_tokens=12, eos_token_id=None)
        logits = model(input_ids=prompt).logits
    local = setup["local"]
    expected = _local_generate(local, prompt, 12, setup["adapter"])
    assert torch.equal(out, expected)
    torch.testing.assert_close(
        logits, local(input_ids=prompt, lora=setup["adapter"]).logits, atol=1e-4, rtol=0
    )
    plain = _local_generate(local, prompt, 12)
    assert not torch.equal(out, plain)  # the adapter really changed the model


def test_unknown_adapter_is_a_clear_error(setup: dict[str, Any]) -> None:
    from potluck import UnknownAdapterError

    with (
        _client(setup, active_adapter="nope") as model,
        pytest.raises(UnknownAdapterError, match=f"adapter 'nope' not loaded \\(offers: {ADAPTER}\\)"),
    ):
        model(input_ids=_batch(6))


@pytest.mark.parametrize("mode", ["lora", "deep_ptune"])
def test_thirty_steps_of_finetuning_lower_the_loss(
    setup: dict[str, Any], mode: str, tmp_path: Path, capsys: Any
) -> None:
    from potluck.cli.finetune import run_finetune

    args = argparse.Namespace(
        model=setup["path"], initial_peers=setup["peers"], host=None, mode=mode, pre_seq_len=4, lora_rank=4,
        lora_alpha=8.0, lora_targets=[], data=None, steps=30, batch_size=4, seq_len=16, lr=0.1 if mode != "lora" else 3e-2, seed=0,
        save=str(tmp_path / "out"), json=True, quiet=True,
    )  # fmt: skip
    assert run_finetune(args) == 0
    import json

    losses = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["losses"]
    assert len(losses) == 30
    # LoRA has far more capacity than a 4-token prompt: expect a clear drop from both, a steep one from LoRA.
    assert sum(losses[-5:]) / 5 < (0.8 if mode == "lora" else 0.95) * sum(losses[:5]) / 5
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert saved == (
        {"adapter_config.json", "adapter_model.safetensors"} if mode == "lora" else {"prompts.safetensors"}
    )
