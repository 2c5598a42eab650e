"""The family registry and what only some families have: MoE routing paths, placement sizes, LoRA target tables."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from potluck.models import LoraConfig, LoraWeights, save_peft_adapter
from potluck.models.family import ModelFamily
from potluck.models.peft_format import PeftFormatError
from potluck.models.registry import FAMILIES, get_family
from tiny_models import KINDS, make_config


@pytest.mark.parametrize("kind", KINDS)
def test_lora_target_tables_match_the_blocks(kind: str) -> None:
    """Every LoRA target of a family names a real weight of its block with the features the table says."""
    config = make_config(kind)
    family: ModelFamily = get_family(config)
    spec = family.spec_from_config(config)
    with torch.device("meta"):
        block = family.make_block(spec, 0)
    weights = dict(block.named_parameters())
    assert set(family.default_lora_targets) <= set(family.lora_targets)
    for name, target in family.lora_targets.items():
        in_f, out_f = target.features(spec)
        if target.experts is None:
            assert tuple(weights[target.path + ".weight"].shape) == (out_f, in_f), name
        else:
            assert tuple(weights[target.path].shape) == (target.experts(spec), out_f, in_f), name


def test_every_family_is_listed_once() -> None:
    names = [f.name for f in FAMILIES]
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(set(names)) == len(names) and len(set(types)) == len(types)
    assert {"qwen3", "gemma2", "mixtral", "falcon"} <= set(names)


def test_moe_gathered_and_grouped_paths_agree_with_expert_lora(
    local_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode (gather each token's experts) and prefill (group tokens by expert) compute the same MoE, LoRA too."""
    from potluck.models import mixtral

    model = local_model("mixtral")
    spec = model.spec
    config = LoraConfig(rank=4, alpha=8.0, targets=(mixtral.GATE_UP, mixtral.DOWN, "q_proj"))
    lora = LoraWeights.init_random(
        spec, config, 0, spec.num_blocks, generator=torch.Generator().manual_seed(1)
    )
    moe = model.span.blocks[0].mlp
    x = torch.randn(1, 3, spec.hidden_size, generator=torch.Generator().manual_seed(2))  # 3 tokens: 6 pairs
    block_lora = lora.block(0)
    with torch.no_grad():
        monkeypatch.setattr(mixtral, "GATHER_MAX_PAIRS", 1000)
        gathered = moe(x, block_lora)
        monkeypatch.setattr(mixtral, "GATHER_MAX_PAIRS", 0)
        grouped = moe(x, block_lora)
        plain = moe(x)
    torch.testing.assert_close(gathered, grouped, atol=1e-5, rtol=0)
    assert (gathered - plain).abs().max() > 1e-3  # the expert adapters did change the output


def test_moe_routing_is_transformers_top2_renormalised(local_model: Any, hf_model: Any) -> None:
    ours = local_model("mixtral").span.blocks[0].mlp
    theirs = hf_model("mixtral").model.layers[0].mlp.gate
    x = torch.randn(5, ours.gate.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights, index = ours.route(x)
        _, ref_weights, ref_index = theirs(x)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5), atol=1e-6, rtol=0)


def test_placement_counts_every_expert() -> None:
    """A MoE block's size (what --num-blocks sizing uses) includes all experts: they all stay resident."""
    from potluck.server.placement import block_bytes

    config = make_config("mixtral")
    spec = get_family(config).spec_from_config(config)
    h, inter, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    attn = h * spec.num_heads * spec.head_dim * 2 + h * spec.num_kv_heads * spec.head_dim * 2
    expected = attn + e * 3 * h * inter + e * h + 2 * h  # attention, experts, router, two norms
    assert block_bytes(config, torch.float32) == 4 * expected
    assert block_bytes(config, torch.bfloat16) == 2 * expected


def test_expert_lora_cannot_be_saved_in_peft_format_yet(local_model: Any, tmp_path: Any) -> None:
    from potluck.models import mixtral

    spec = local_model("mixtral").spec
    lora = LoraWeights.init(spec, LoraConfig(rank=2, targets=(mixtral.DOWN,)), 0, spec.num_blocks)
    with pytest.raises(PeftFormatError, match="stacked experts"):
        save_peft_adapter(tmp_path / "a", lora, spec)
