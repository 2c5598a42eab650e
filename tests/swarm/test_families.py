"""The families of issue 15 through a loopback swarm: generation, LoRA gradients vs PEFT, failover mid-generation.

One swarm per family (bootstrap + servers 0:3, 3:8 and a standby 3:8), shared by that family's tests; the failover
test kills a server, so it runs last for each family (pytest groups tests by the module-scoped parameter).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm, SwarmProcess
from potluck.models import get_family, load_config
from tiny_models import NEW_FAMILY_KINDS

pytestmark = pytest.mark.swarm

NEW_TOKENS = 24
FAIL_AT = 8
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module", params=NEW_FAMILY_KINDS)
def family_swarm(
    request: pytest.FixtureRequest, tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    kind = request.param
    path = tiny_model_dir(kind)
    with LocalSwarm(tmp_path_factory.mktemp(f"logs-{kind}")) as swarm:
        swarm.start_bootstrap()
        extra = ["--update-period", "2"]
        procs = [
            swarm.start_server(path, span, wait=False, extra_args=extra) for span in ((0, 3), (3, 8), (3, 8))
        ]
        swarm.wait_ready(procs)
        yield {"kind": kind, "path": path, "swarm": swarm, "procs": procs}


def _client(setup: dict[str, Any], **kwargs: Any) -> Any:
    kwargs.setdefault("step_timeout", 20.0)
    kwargs.setdefault("wait_for_servers", 30.0)
    return AutoDistributedModelForCausalLM.from_pretrained(
        setup["path"], initial_peers=setup["swarm"].initial_peers, load_tokenizer=False, **kwargs
    )


def _hf(path: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _prompt(seed: int, batch: int = 1, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generation_equals_transformers(family_swarm: dict[str, Any]) -> None:
    prompt = _prompt(0)
    expected = _hf(family_swarm["path"]).generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    with _client(family_swarm) as model:
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert torch.equal(out, expected)


# --- LoRA vs PEFT ---------------------------------------------------------------------------------------------


def _peft_adapters(pm: Any, family: Any) -> dict[tuple[str, int], tuple[Any, Any, int]]:
    """``(target, block) -> (lora_A module, lora_B module, experts)`` of a PEFT model, found by module path."""
    by_path = {t.path: name for name, t in family.lora_targets.items()}
    block_re = re.escape(family.block_prefix_template).replace(re.escape("{i}"), r"(\d+)")
    found: dict[tuple[str, int], tuple[Any, Any, int]] = {}
    for name, module in pm.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        match = re.search(block_re + r"(.*)$", name)
        assert match is not None, name
        block, path = int(match.group(1)), match.group(2)
        param = getattr(module, "parameter_name", None)  # PEFT's ParamWrapper (stacked experts)
        if param is not None:
            path = path.removesuffix(".base_layer").removesuffix(".base_layer") + "." + param
        found[(by_path[path], block)] = (
            module.lora_A["default"].weight,
            module.lora_B["default"].weight,
            getattr(module, "num_experts", 1) if param is not None else 0,
        )
    return found


def _to_peft(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our A [(E,) r, in], B [(E,) out, r] -> PEFT's weights (experts: A [E*r, in], B [out, r*E])."""
    if not experts:
        return a, b
    return a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1)


def _from_peft(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not experts:
        return a, b
    return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)


def test_lora_gradients_through_the_swarm_equal_peft(family_swarm: dict[str, Any]) -> None:
    family = get_family(load_config(family_swarm["path"]))
    targets = tuple(family.lora_targets)  # every target, incl. the MoE experts
    ids = _prompt(1, batch=2, length=12)
    with _client(family_swarm, lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets) as model:
        with (
            torch.no_grad()
        ):  # B starts at zero (PEFT init); make it non-zero so A's gradient is non-zero too
            for b in model.lora.b.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        ours = {t: (model.lora.a[t].detach(), model.lora.b[t].detach()) for t in targets}
        grads = {t: (model.lora.a[t].grad, model.lora.b[t].grad) for t in targets}

    modules = [t for t in targets if family.lora_targets[t].experts is None]
    params = [family.lora_targets[t].path for t in targets if family.lora_targets[t].experts is not None]
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=modules, target_parameters=params or None,
        lora_dropout=0.0, init_lora_weights=False,
    )  # fmt: skip
    pm = peft.get_peft_model(_hf(family_swarm["path"]), config)
    adapters = _peft_adapters(pm, family)
    num_blocks = model.client.spec.num_blocks
    assert set(adapters) == {(t, i) for t in targets for i in range(num_blocks)}
    with torch.no_grad():
        for (target, block), (a, b, experts) in adapters.items():
            pa, pb = _to_peft(ours[target][0][block], ours[target][1][block], experts)
            a.copy_(pa)
            b.copy_(pb)
    ref = pm(input_ids=ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    for (target, block), (a, b, experts) in adapters.items():
        ga, gb = _from_peft(a.grad, b.grad, experts)
        torch.testing.assert_close(grads[target][0][block], ga, atol=1e-4, rtol=0)
        torch.testing.assert_close(grads[target][1][block], gb, atol=1e-4, rtol=0)
    for target in targets:  # (an expert no token was routed to has zero gradients, on both sides)
        assert grads[target][0].abs().sum() > 0 and grads[target][1].abs().sum() > 0, target


# --- failover -------------------------------------------------------------------------------------------------


class _AtToken:
    """A streamer that calls ``action`` once, after ``at`` new tokens were produced."""

    def __init__(self, at: int, action: Any):
        self.at, self.action, self.seen = at, action, -1  # -1: the prompt is put first

    def put(self, value: Any) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.action()

    def end(self) -> None:
        pass


def test_failover_mid_generation_is_exact(family_swarm: dict[str, Any]) -> None:
    """SIGKILL the server holding blocks 3:8 mid-generation; the standby takes over (runs last: it kills)."""
    prompt = _prompt(2)
    expected = _hf(family_swarm["path"]).generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    swarm: LocalSwarm = family_swarm["swarm"]
    procs: list[SwarmProcess] = family_swarm["procs"]
    with _client(family_swarm) as model, model.inference_session(max_length=64) as session:
        peer = session.remote.hops[1].peer_id
        victim = next(p for p in procs if p.peer_id == peer)
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=_AtToken(FAIL_AT, lambda: swarm.kill(victim)),
        )
        assert session.remote.failovers == 1
        assert victim.peer_id not in [h.peer_id for h in session.remote.hops]
    assert torch.equal(out, expected)
