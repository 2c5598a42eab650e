"""LoRA adapters inside potluck's blocks vs PEFT on the transformers model; PEFT file format both ways."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import peft  # the oracle: tests compare our LoRA against PEFT
import pytest
import torch

from potluck.models import (
    LORA_TARGETS,
    LocalCausalLM,
    LoraConfig,
    LoraWeights,
    load_peft_adapter,
    save_peft_adapter,
)
from potluck.models.peft_format import PeftFormatError

KINDS = ("llama-gqa-llama3rope", "bloom")
RANK, ALPHA = 4, 8.0
ATOL = 1e-4

# where PEFT puts each target's adapter (independent of potluck's own tables)
BLOCK_PREFIX = {"llama": "model.layers.{i}.", "bloom": "transformer.h.{i}."}
MODULE_PATH = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "query_key_value": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}


def _family(kind: str) -> str:
    return "bloom" if kind == "bloom" else "llama"


def _ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _fresh_hf(path: str) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _peft_model(path: str, targets: tuple[str, ...], seed: int = 0) -> Any:
    """PEFT model over a fresh HF copy with non-zero random A and B (``init_lora_weights=False``)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(_fresh_hf(path), config).eval()


def _peft_param_name(family: str, i: int, target: str, which: str) -> str:
    prefix = BLOCK_PREFIX[family].format(i=i)
    return f"base_model.model.{prefix}{MODULE_PATH[target]}.lora_{which}.default.weight"


def _lora_from_peft(peft_model: Any, family: str, num_blocks: int, targets: tuple[str, ...]) -> LoraWeights:
    params = dict(peft_model.named_parameters())
    a = {
        t: torch.stack([params[_peft_param_name(family, i, t, "A")].detach() for i in range(num_blocks)])
        for t in targets
    }
    b = {
        t: torch.stack([params[_peft_param_name(family, i, t, "B")].detach() for i in range(num_blocks)])
        for t in targets
    }
    return LoraWeights(LoraConfig(rank=RANK, alpha=ALPHA, targets=targets), 0, num_blocks, a, b)


@pytest.fixture(scope="module")
def fresh_local(tiny_checkpoint: Callable[..., str]) -> Callable[[str], LocalCausalLM]:
    """Own LocalCausalLM copies (these tests run backward, so keep the shared fixtures' .grad untouched)."""
    cache: dict[str, LocalCausalLM] = {}

    def get(kind: str) -> LocalCausalLM:
        if kind not in cache:
            model = LocalCausalLM.from_pretrained(tiny_checkpoint(kind))
            model.requires_grad_(False)
            cache[kind] = model
        return cache[kind]

    return get


# ---------------------------------------------------------------------------------------------------------------
# numerics vs PEFT


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_grads_match_peft(kind, tiny_checkpoint, fresh_local):
    family = _family(kind)
    targets = LORA_TARGETS[family]  # every projection
    pm = _peft_model(tiny_checkpoint(kind), targets)
    model = fresh_local(kind)
    lora = _lora_from_peft(pm, family, model.spec.num_blocks, targets).requires_grad_()
    ids = _ids()

    embeds = model.client.embed(ids).detach().requires_grad_()
    ours = model(inputs_embeds=embeds, labels=ids, lora=lora)
    ours.loss.backward()

    pm.zero_grad()
    hf_embeds = pm.get_input_embeddings()(ids).detach().requires_grad_()
    ref = pm(inputs_embeds=hf_embeds, labels=ids)
    ref.loss.backward()

    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(embeds.grad, hf_embeds.grad, rtol=0, atol=ATOL)
    params = dict(pm.named_parameters())
    for t in targets:
        assert lora.a[t].grad is not None and lora.b[t].grad is not None
        assert lora.b[t].grad.abs().sum() > 0
        for i in range(model.spec.num_blocks):
            torch.testing.assert_close(
                lora.a[t].grad[i], params[_peft_param_name(family, i, t, "A")].grad, rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                lora.b[t].grad[i], params[_peft_param_name(family, i, t, "B")].grad, rtol=0, atol=ATOL
            )
    # adapters actually change the model
    with torch.no_grad():
        assert (model(ids).logits - ours.logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_load_peft_saved_adapter_matches_peft(kind, tiny_checkpoint, fresh_local, tmp_path):
    family = _family(kind)
    targets = ("q_proj", "v_proj", "down_proj") if family == "llama" else ("query_key_value", "dense")
    pm = _peft_model(tiny_checkpoint(kind), targets, seed=1)
    pm.save_pretrained(str(tmp_path))
    model = fresh_local(kind)

    lora = load_peft_adapter(tmp_path, model.spec, dtype=torch.float32, device="cpu")
    copied = _lora_from_peft(pm, family, model.spec.num_blocks, targets)
    assert lora.config.rank == RANK and lora.config.alpha == ALPHA
    assert set(lora.config.targets) == set(targets)
    assert (lora.start, lora.end) == (0, model.spec.num_blocks)
    for t in targets:
        torch.testing.assert_close(lora.a[t], copied.a[t], rtol=0, atol=0)
        torch.testing.assert_close(lora.b[t], copied.b[t], rtol=0, atol=0)

    ids = _ids(seed=2)
    torch.testing.assert_close(model(ids, lora=lora).logits, pm(input_ids=ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_cached_decoding_with_lora_matches_full_forward(kind, fresh_local):
    model = fresh_local(kind)
    family = _family(kind)
    config = LoraConfig(rank=RANK, alpha=ALPHA, targets=LORA_TARGETS[family])
    lora = LoraWeights.init_random(
        model.spec, config, 0, model.spec.num_blocks, generator=torch.Generator().manual_seed(0)
    )
    ids = _ids(seq=16, seed=3)
    full = model(ids, lora=lora).logits
    cache = model.new_cache(batch_size=2, max_length=16)
    chunks = [ids[:, :5], ids[:, 5:9]] + [ids[:, t : t + 1] for t in range(9, 16)]
    pieces = [model.step(chunk, cache, lora=lora) for chunk in chunks]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=ATOL)
    assert (model(ids).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_save_peft_adapter_loads_in_peft(kind, tiny_checkpoint, fresh_local, tmp_path):
    family = _family(kind)
    model = fresh_local(kind)
    config = LoraConfig(rank=RANK, alpha=ALPHA, targets=LORA_TARGETS[family][:3])
    lora = LoraWeights.init_random(
        model.spec, config, 0, model.spec.num_blocks, generator=torch.Generator().manual_seed(5)
    )
    ours_dir, peft_dir = tmp_path / "ours", tmp_path / "peft"
    save_peft_adapter(ours_dir, lora, model.spec, base_model_name_or_path="tiny/base")

    cfg = json.loads((ours_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA and cfg["target_modules"] == list(config.targets)
    assert cfg["base_model_name_or_path"] == "tiny/base"

    pm = peft.PeftModel.from_pretrained(_fresh_hf(tiny_checkpoint(kind)), str(ours_dir)).eval()
    ids = _ids(seed=4)
    torch.testing.assert_close(pm(input_ids=ids).logits, model(ids, lora=lora).logits, rtol=0, atol=ATOL)

    # PEFT writes the same tensor names and shapes we do
    pm.save_pretrained(str(peft_dir))
    from safetensors.torch import load_file

    ours_tensors = load_file(str(ours_dir / "adapter_model.safetensors"))
    peft_tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert ours_tensors.keys() == peft_tensors.keys()
    for key, value in ours_tensors.items():
        torch.testing.assert_close(value, peft_tensors[key], rtol=0, atol=0)

    # and our own loader round-trips
    back = load_peft_adapter(ours_dir, model.spec)
    assert back.config == config
    for x, y in zip(back.tensors(), lora.tensors(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@torch.no_grad()
def test_load_peft_regex_target_modules(tiny_checkpoint, fresh_local, tmp_path):
    kind = "llama-gqa-llama3rope"
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=r".*\.(k_proj|up_proj)", init_lora_weights=False
    )
    pm = peft.get_peft_model(_fresh_hf(tiny_checkpoint(kind)), config).eval()
    pm.save_pretrained(str(tmp_path))
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"], str)
    model = fresh_local(kind)
    lora = load_peft_adapter(tmp_path, model.spec)
    assert lora.config.targets == ("k_proj", "up_proj")  # canonical family order
    ids = _ids(seed=6)
    torch.testing.assert_close(model(ids, lora=lora).logits, pm(input_ids=ids).logits, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# PEFT format errors


def _write_adapter(tmp_path, spec, **overrides: Any) -> str:
    lora = LoraWeights.init_random(spec, LoraConfig(rank=2, alpha=4, targets=("q_proj",)), 0, spec.num_blocks)
    path = str(tmp_path / "adapter")
    save_peft_adapter(path, lora, spec)
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(overrides)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"use_dora": True}, "use_dora"),
        ({"use_rslora": True}, "use_rslora"),
        ({"bias": "all"}, "bias"),
        ({"layers_to_transform": [0, 1]}, "layers_to_transform"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"r": 0}, "r must be"),
    ],
)
def test_load_peft_rejects_unsupported_options(override, message, fresh_local, tmp_path):
    spec = fresh_local("llama-gqa-llama3rope").spec
    path = _write_adapter(tmp_path, spec, **override)
    with pytest.raises(PeftFormatError, match=message):
        load_peft_adapter(path, spec)


def test_load_peft_file_errors(fresh_local, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = fresh_local("llama-gqa-llama3rope").spec
    with pytest.raises(PeftFormatError, match="adapter_config.json"):
        load_peft_adapter(tmp_path, spec)

    path = _write_adapter(tmp_path, spec)
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    os.rename(weights, os.path.join(path, "adapter_model.bin"))
    with pytest.raises(PeftFormatError, match="only safetensors"):
        load_peft_adapter(path, spec)

    # a block without adapters (layers_to_transform-like) is rejected
    missing = {k: v for k, v in tensors.items() if ".layers.3." not in k}
    save_file(missing, weights)
    with pytest.raises(PeftFormatError, match=r"missing for blocks \[3\]"):
        load_peft_adapter(path, spec)

    # tensors on modules we cannot adapt
    extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)})
    save_file(extra, weights)
    with pytest.raises(PeftFormatError, match="lm_head"):
        load_peft_adapter(path, spec)

    # a different model's shapes
    bloom_spec = fresh_local("bloom").spec
    save_file(tensors, weights)
    with pytest.raises(PeftFormatError):
        load_peft_adapter(path, bloom_spec)
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(wrong, weights)
    with pytest.raises(PeftFormatError, match="does not fit"):
        load_peft_adapter(path, spec)


def test_save_peft_needs_all_blocks(fresh_local, tmp_path):
    spec = fresh_local("bloom").spec
    lora = LoraWeights.init(spec, LoraConfig(targets=("dense",)), 1, spec.num_blocks)
    with pytest.raises(ValueError, match="all 8 blocks"):
        save_peft_adapter(tmp_path, lora, spec)


# ---------------------------------------------------------------------------------------------------------------
# config, tensors, init


def test_config_validation():
    config = LoraConfig()
    assert config.rank == 8 and config.alpha == 16.0 and config.targets == ("q_proj", "v_proj")
    assert config.scaling == 2.0
    config.validate("llama")
    with pytest.raises(ValueError, match=r"'q_proj'.*valid targets: query_key_value, dense"):
        config.validate("bloom")
    with pytest.raises(ValueError, match="'qproj'"):
        LoraConfig(targets=("qproj", "v_proj")).validate("llama")
    with pytest.raises(ValueError, match="family"):
        config.validate("gpt2")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=())
    with pytest.raises(ValueError, match="duplicates"):
        LoraConfig(targets=("q_proj", "q_proj"))
    assert LoraConfig(targets=["k_proj"]).targets == ("k_proj",)  # type: ignore[arg-type]

    custom = LoraConfig(rank=4, alpha=8, targets=("o_proj", "down_proj"))
    assert LoraConfig.from_dict(custom.to_dict()) == custom
    assert LoraConfig.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(ValueError, match="unknown"):
        LoraConfig.from_dict({"rank": 4, "dropout": 0.1})


def test_from_tensors_and_shapes(fresh_local):
    spec = fresh_local("llama-gqa-llama3rope").spec  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 128
    config = LoraConfig(rank=3, alpha=6, targets=("k_proj", "down_proj"))
    shapes = LoraWeights.shapes(spec, config, 2)
    assert shapes == {"k_proj": ((2, 3, 64), (2, 32, 3)), "down_proj": ((2, 3, 128), (2, 64, 3))}

    lora = LoraWeights.init_random(spec, config, 3, 5, generator=torch.Generator().manual_seed(0))
    assert lora.num_blocks == 2
    tensors = lora.tensors()
    assert [tuple(t.shape) for t in tensors] == [(2, 3, 64), (2, 32, 3), (2, 3, 128), (2, 64, 3)]
    back = LoraWeights.from_tensors(config, 3, 5, tensors, spec=spec)
    assert all(x is y for x, y in zip(back.tensors(), tensors, strict=True))

    with pytest.raises(ValueError, match="expected 4 LoRA tensors"):
        LoraWeights.from_tensors(config, 3, 5, tensors[:3])
    with pytest.raises(ValueError, match=r"must be \[3, 3, in_features\]"):
        LoraWeights.from_tensors(config, 3, 6, tensors)  # 3 blocks claimed, tensors hold 2
    bad_rank = [torch.zeros(2, 4, 64), tensors[1], tensors[2], tensors[3]]
    with pytest.raises(ValueError, match="A of 'k_proj'"):
        LoraWeights.from_tensors(config, 3, 5, bad_rank)
    bad_out = [tensors[0], torch.zeros(2, 64, 3), tensors[2], tensors[3]]  # k_proj has 32 outputs (GQA)
    LoraWeights.from_tensors(config, 3, 5, bad_out)  # shapes are self-consistent without a spec...
    with pytest.raises(ValueError, match=r"'k_proj'.*expected A \(2, 3, 64\) and B \(2, 32, 3\)"):
        LoraWeights.from_tensors(config, 3, 5, bad_out, spec=spec)  # ...but not with the model's
    with pytest.raises(ValueError, match="num_blocks|8 blocks"):
        LoraWeights.from_tensors(config, 7, 9, tensors, spec=spec)
    with pytest.raises(ValueError, match="valid targets"):
        LoraWeights.from_tensors(LoraConfig(rank=3, targets=("dense", "down_proj")), 3, 5, tensors, spec=spec)


def test_init_is_peft_default(fresh_local):
    model = fresh_local("llama-gqa-llama3rope")
    spec = model.spec
    config = LoraConfig(rank=4, targets=("q_proj", "down_proj"))
    lora = LoraWeights.init(spec, config, 0, spec.num_blocks, generator=torch.Generator().manual_seed(0))
    again = LoraWeights.init(spec, config, 0, spec.num_blocks, generator=torch.Generator().manual_seed(0))
    for t in config.targets:
        assert torch.equal(lora.a[t], again.a[t])
        assert torch.count_nonzero(lora.b[t]) == 0
        bound = 1 / lora.a[t].shape[-1] ** 0.5
        assert lora.a[t].abs().max() <= bound and lora.a[t].abs().max() > 0.5 * bound
        assert lora.a[t][0].std() > 0 and not torch.equal(lora.a[t][0], lora.a[t][1])
    ids = _ids(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, lora=lora).logits, model(ids).logits, rtol=0, atol=0)
    zeros = LoraWeights.zeros_like_spec(spec, config, 2, 4, dtype=torch.bfloat16)
    assert zeros.dtype == torch.bfloat16 and all(torch.count_nonzero(x) == 0 for x in zeros.tensors())
    half = lora.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and lora.dtype == torch.float32
    assert lora.to(dtype=torch.float32) is lora


# ---------------------------------------------------------------------------------------------------------------
# spans


@pytest.mark.parametrize("kind", KINDS)
def test_span_slice_with_lora(kind, fresh_local):
    model = fresh_local(kind)
    spec = model.spec
    config = LoraConfig(rank=RANK, alpha=ALPHA, targets=LORA_TARGETS[_family(kind)][:2])
    lora = LoraWeights.init_random(
        spec, config, 0, spec.num_blocks, generator=torch.Generator().manual_seed(1)
    )
    lora.requires_grad_()
    hidden = torch.randn(2, 10, spec.hidden_size, generator=torch.Generator().manual_seed(2))

    # reference: the full model's blocks 2..4, one by one, with their own adapters
    with torch.no_grad():
        h = model.span.slice(0, 2)(hidden, lora=lora)
        inputs = model.family.make_attn_inputs(spec, 0, 10, h.device, h.dtype)
        expected = h
        for i in range(2, 5):
            expected = model.span.blocks[i](expected, inputs, None, 0, lora.block(i))

    span = model.span.slice(2, 5)
    sliced = lora.slice(2, 5)
    assert (sliced.start, sliced.end, sliced.num_blocks) == (2, 5, 3)
    assert sliced.a[config.targets[0]].data_ptr() == lora.a[config.targets[0]][2].data_ptr()  # a view
    out_full = span(h, lora=lora)  # superset: sliced by the span
    out_sliced = span(h, lora=sliced)
    torch.testing.assert_close(out_full, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out_sliced, out_full, rtol=0, atol=0)

    # gradients through the slice reach only rows 2..4 of the caller's tensors
    out_sliced.square().mean().backward()
    for t in config.targets:
        grad = lora.b[t].grad
        assert grad is not None
        assert grad[2:5].abs().sum() > 0
        assert torch.count_nonzero(grad[:2]) == 0 and torch.count_nonzero(grad[5:]) == 0

    with pytest.raises(ValueError, match="does not include"):
        model.span.slice(1, 5)(h, lora=sliced)
    with pytest.raises(ValueError, match="sub-range"):
        lora.slice(5, 9)


@torch.no_grad()
def test_local_forward_with_prompts_and_lora(fresh_local):
    model = fresh_local("llama-gqa-llama3rope")
    spec = model.spec
    lora = LoraWeights.init_random(
        spec,
        LoraConfig(rank=2, targets=("v_proj", "o_proj")),
        0,
        spec.num_blocks,
        generator=torch.Generator().manual_seed(3),
    )
    prompts = 0.1 * torch.randn(
        spec.num_blocks, 1, 3, spec.hidden_size, generator=torch.Generator().manual_seed(4)
    )
    ids = _ids(seq=8, seed=8)
    got = model(ids, prompts=prompts, lora=lora).logits
    hidden = model.span(model.client.pre_blocks(model.client.embed(ids)), prompts=prompts, lora=lora)
    torch.testing.assert_close(got, model.client.head(hidden), rtol=0, atol=0)
    assert (got - model(ids, lora=lora).logits).abs().max() > 1e-4
    assert (got - model(ids, prompts=prompts).logits).abs().max() > 1e-4
