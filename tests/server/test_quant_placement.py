"""Quantization in the server's memory accounting: --quant auto and --num-blocks sizing (pure)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from potluck.models.quant import QuantizationError
from potluck.server import placement
from potluck.server.placement import block_bytes, choose_quant, size_num_blocks


def _config() -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=64,
        num_attention_heads=16,
    )


def test_auto_is_nf4_on_cuda_only_when_bf16_does_not_fit() -> None:
    assert choose_quant("auto", "cuda:0", fits_unquantized=False) == "nf4"
    assert choose_quant("auto", "cuda:0", fits_unquantized=True) == "none"
    assert choose_quant("auto", "cpu", fits_unquantized=False) == "none"
    assert choose_quant("int8", "cpu", fits_unquantized=True) == "int8"
    with pytest.raises(QuantizationError):
        choose_quant("fp4", "cpu", fits_unquantized=True)


def test_num_blocks_sizing_uses_the_quantized_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config()
    cache = placement.cache_bytes_per_block(config, torch.bfloat16, 1024)
    free = int(10 * (block_bytes(config, torch.bfloat16) + cache) / placement.MEMORY_FRACTION) + 1
    monkeypatch.setattr(placement, "free_memory_bytes", lambda device: free)
    plain = size_num_blocks(config, torch.bfloat16, "cuda:0", 1024)
    nf4 = size_num_blocks(config, torch.bfloat16, "cuda:0", 1024, "nf4")
    int8 = size_num_blocks(config, torch.bfloat16, "cuda:0", 1024, "int8")
    assert plain == 10
    expected_nf4 = int(free * placement.MEMORY_FRACTION) // (
        block_bytes(config, torch.bfloat16, "nf4") + cache
    )
    assert nf4 == expected_nf4 and nf4 > int8 > plain
    # the whole model would not fit in bf16 here, so `auto` picks nf4 on CUDA
    assert not placement.span_fits(config, torch.bfloat16, "cuda:0", 1024, None)
    assert placement.span_fits(config, torch.bfloat16, "cuda:0", 1024, 8)
