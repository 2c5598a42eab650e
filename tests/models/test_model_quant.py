"""Quantized spans (int8, NF4 via bitsandbytes) against transformers' own BitsAndBytesConfig models.

Tolerance: with fp32 compute both sides run the same bitsandbytes kernels on bit-identical quantized weights, so
logits (magnitude ~1-5) agree to max |diff| <= 1e-4 (measured: int8 0.0, nf4 ~3e-6, the rest is attention's
float order); the quantization error itself (vs the unquantized model) is orders of magnitude larger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from potluck.models import load_client_parts, load_span
from potluck.models.quant import (
    QuantizationError,
    module_bytes,
    module_quant,
    quantized_block_bytes,
)

LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def quant_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from quant_models import make_quant_model

    return make_quant_model(tmp_path_factory.mktemp("quant_llama"))


@pytest.fixture(scope="module")
def hf_quant(quant_checkpoint: str) -> Callable[[str], Any]:
    from quant_models import hf_quantized

    cache: dict[str, Any] = {}

    def get(quant: str) -> Any:
        if quant not in cache:
            cache[quant] = hf_quantized(quant_checkpoint, quant)
        return cache[quant]

    return get


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {n: m for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in names}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_span_matches_transformers_bnb_model(
    quant: str, quant_checkpoint: str, hf_quant: Callable[[str], Any]
) -> None:
    hf = hf_quant(quant)
    span = load_span(quant_checkpoint, 0, 2, quant=quant)
    assert module_quant(span) == quant
    # the same quantized bytes and statistics as transformers' loader produced
    for i, block in enumerate(span.blocks):
        ours, theirs = _linears(block), _linears(hf.model.layers[i])
        assert ours.keys() == theirs.keys() and len(ours) == 7
        for name, layer in ours.items():
            assert type(layer) is type(theirs[name])
            assert torch.equal(layer.weight.data, theirs[name].weight.data), name
    # norms stay unquantized
    assert span.blocks[0].input_layernorm.weight.dtype == torch.float32
    parts = load_client_parts(quant_checkpoint)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = hf(input_ids=ids).logits.float()  # [2, 12, V]
        got = parts.head(span(parts.pre_blocks(parts.embed(ids))))
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
    if quant == "nf4":  # weight-only quantization: a token's result does not depend on its neighbours
        # LLM.int8 picks outlier columns over the whole input of a matmul, so int8 results depend on which
        # tokens share a call; it is compared call-for-call (prefill, then steps) in the swarm's generation test
        with torch.inference_mode():
            cache = span.new_cache(2, 12)
            assert cache.dtype == torch.float32
            steps = [
                parts.head(span(parts.pre_blocks(parts.embed(ids[:, t : t + 1])), cache=cache))
                for t in range(12)
            ]
        torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=LOGITS_ATOL, rtol=0)


def test_input_gradients_flow_through_quantized_spans(quant_checkpoint: str) -> None:
    for quant in ("nf4", "int8"):
        span = load_span(quant_checkpoint, 0, 2, quant=quant).requires_grad_(False)  # frozen, as on a server
        x = torch.randn(1, 5, 1024, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        span(x).square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_block_size_estimate_equals_loaded_size(quant: str, quant_checkpoint: str) -> None:
    span = load_span(quant_checkpoint, 0, 2, dtype=torch.bfloat16, quant=quant)
    with torch.device("meta"):
        block = span.family.make_block(span.spec, 0)
    assert module_bytes(span.blocks[0]) == quantized_block_bytes(block, quant, torch.bfloat16)  # type: ignore[arg-type]


def test_bench_model_block_sizes() -> None:
    """The bench model (hidden 1024, intermediate 2816): nf4 at most 0.35x and int8 about 0.5x of bf16."""
    import transformers

    from potluck.server.placement import block_bytes

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
    )
    bf16 = block_bytes(config, torch.bfloat16)
    assert bf16 == (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024) * 2
    assert block_bytes(config, torch.bfloat16, "nf4") <= 0.35 * bf16
    assert block_bytes(config, torch.bfloat16, "int8") <= 0.55 * bf16


def test_unknown_quant_is_refused(quant_checkpoint: str) -> None:
    with pytest.raises(QuantizationError, match="unknown quantization"):
        load_span(quant_checkpoint, 0, 1, quant="int4")


def test_server_held_peft_adapter_on_nf4_span_matches_peft_on_transformers_nf4(
    quant_checkpoint: str, tmp_path: Any
) -> None:
    """The server's path for ``--adapters``: a PEFT adapter loaded with load_adapters, applied on an nf4 span."""
    import peft

    from potluck.models import LoraConfig, LoraWeights, save_peft_adapter
    from potluck.server.tuning import load_adapters

    span = load_span(quant_checkpoint, 0, 2, quant="nf4").requires_grad_(False)
    config = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    adapter = LoraWeights.init_random(span.spec, config, 0, 2, generator=torch.Generator().manual_seed(5))
    adapter_dir = tmp_path / "adapter"
    save_peft_adapter(str(adapter_dir), adapter, span.spec, base_model_name_or_path=quant_checkpoint)
    held = load_adapters((str(adapter_dir),), span.spec, 0, 2, dtype=torch.float32, device="cpu")["adapter"]
    parts = load_client_parts(quant_checkpoint)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(6))
    from quant_models import hf_quantized

    # a fresh model: PEFT injects its layers in place, the module's cached oracle must stay plain
    ref = peft.PeftModel.from_pretrained(hf_quantized(quant_checkpoint, "nf4"), str(adapter_dir)).eval()
    with torch.inference_mode():
        got = parts.head(span(parts.pre_blocks(parts.embed(ids)), lora=held))
        plain = parts.head(span(parts.pre_blocks(parts.embed(ids))))
        want = ref(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
    assert (got - plain).abs().max() > 100 * LOGITS_ATOL  # the adapter really changed the output
