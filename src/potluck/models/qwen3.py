"""Qwen3 (dense): Llama-style blocks plus RMSNorm over head_dim on queries and keys before RoPE.

Differences from Qwen2: no q/k/v biases (``attention_bias``, default False) and the q/k norms. Sliding-window
layers (``use_sliding_window``, rarely set) follow ``layer_types`` like Qwen2. The block is
:class:`potluck.models.llama.LlamaBlock` with ``spec.qk_norm`` set; checkpoint names are Llama's plus
``self_attn.q_norm`` / ``self_attn.k_norm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from potluck.models import llama
from potluck.models.family import ModelFamily
from potluck.models.spec import ModelSpec


def spec_from_config(config: Any) -> ModelSpec:
    spec = llama.spec_from_config(config)
    bias = bool(getattr(config, "attention_bias", False))
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    windows: tuple[int | None, ...] = ()
    if window is not None:
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * spec.num_blocks
        windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return dataclasses.replace(
        spec, family="qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=windows
    )


FAMILY = ModelFamily(
    name="qwen3",
    model_types=("qwen3",),
    base_prefix="model.",
    block_prefix_template="model.layers.{i}.",
    client_tensor_names=llama.LLAMA_CLIENT_TENSORS,
    spec_from_config=spec_from_config,
    make_block=llama.LlamaBlock,
    make_attn_inputs=llama.make_attn_inputs,
    make_final_norm=llama.make_final_norm,
    lora_targets={**llama.attention_lora_targets(), **llama.mlp_lora_targets()},
    default_lora_targets=("q_proj", "v_proj"),
)
