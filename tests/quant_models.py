"""A small Llama whose hidden size bitsandbytes' CPU kernels accept (1024), and its transformers oracles.

``make_quant_model(path)`` saves a 2-block fp32 Llama (hidden 1024, GQA 8/4 heads, intermediate 1024, vocab
256) with deterministic random weights; ``hf_quantized(path, quant)`` loads it in transformers with the
``BitsAndBytesConfig`` that potluck's ``--quant`` mirrors (fp32 compute, so comparisons can be tight).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from potluck.models.quant import keep_nf4_in_compute_dtype

QUANT_VOCAB = 256


def make_quant_model(path: str | os.PathLike[str], seed: int = 0) -> str:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=QUANT_VOCAB, hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=256, rms_norm_eps=1e-6,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            # projection weights ~ 1/sqrt(fan_in) so activations stay O(1) through the blocks
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.04 * noise)
    model.save_pretrained(str(path))
    return str(path)


def bnb_config(quant: str, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers config matching ``potluck serve --quant QUANT --dtype DTYPE``."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(quant)


def hf_quantized(path: str, quant: str, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(quant, dtype), dtype=dtype, device_map="cpu",
        attn_implementation="eager",
    ).eval()  # fmt: skip
    # the oracle computes in the compute dtype it was given, as our spans do (not bitsandbytes' bf16 CPU kernel:
    # see keep_nf4_in_compute_dtype)
    keep_nf4_in_compute_dtype(model)
    return model
