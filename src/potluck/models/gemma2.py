"""Gemma 2: Llama-style attention and gated MLP with Gemma's own norms, soft-capping and scales.

* Four RMSNorms per block (before and after attention, before and after the MLP), each scaling by ``1 + weight``
  in fp32 (:class:`potluck.models.layers.UnitOffsetRMSNorm`); the final norm is the same kind.
* Attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped (``attn_logit_softcapping``);
  logits are soft-capped too (``final_logit_softcapping``, applied by the client's head).
* Sliding-window attention on the layers ``layer_types`` marks (every other layer by default).
* Embeddings are multiplied by ``sqrt(hidden)`` (rounded to the weights' dtype, like HF) in the client's ``embed``.
* The MLP is gated GELU with the tanh approximation (``hidden_activation``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from potluck.models import llama
from potluck.models.family import ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, UnitOffsetRMSNorm
from potluck.models.lora import BlockLora
from potluck.models.spec import ModelSpec, UnsupportedModelError


def spec_from_config(config: Any) -> ModelSpec:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise UnsupportedModelError(f"Gemma 2 hidden_activation {act!r} is not supported")
    spec = llama.spec_from_config(config)
    bias = bool(getattr(config, "attention_bias", False))
    num_blocks = spec.num_blocks
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_blocks)
    ]
    windows = tuple(
        int(window) if window is not None and t == "sliding_attention" else None for t in layer_types
    )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("Gemma 2 with use_bidirectional_attention is not supported")
    attn_cap = getattr(config, "attn_logit_softcapping", None)
    final_cap = getattr(config, "final_logit_softcapping", None)
    return dataclasses.replace(
        spec,
        family="gemma2",
        hidden_act=act,
        qkv_bias=bias,
        o_bias=bias,
        sliding_windows=windows,
        attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
        attn_softcap=float(attn_cap) if attn_cap is not None else None,
        final_logit_softcap=float(final_cap) if final_cap is not None else None,
        embed_scale=float(config.hidden_size) ** 0.5,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
    )


class Gemma2Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.self_attn = llama.LlamaAttention(spec, spec.sliding_window(index))
        self.mlp = llama.LlamaMLP(spec)
        self.input_layernorm = UnitOffsetRMSNorm(spec.hidden_size, spec.norm_eps)
        self.post_attention_layernorm = UnitOffsetRMSNorm(spec.hidden_size, spec.norm_eps)
        self.pre_feedforward_layernorm = UnitOffsetRMSNorm(spec.hidden_size, spec.norm_eps)
        self.post_feedforward_layernorm = UnitOffsetRMSNorm(spec.hidden_size, spec.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None = None,
        cache_index: int = 0,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), inputs, cache, cache_index, lora)  # [B, T, hidden]
        h = x + self.post_attention_layernorm(attn)  # [B, T, hidden]
        mlp = self.mlp(self.pre_feedforward_layernorm(h), lora)  # [B, T, hidden]
        return h + self.post_feedforward_layernorm(mlp)  # [B, T, hidden]


def make_final_norm(spec: ModelSpec) -> nn.Module:
    return UnitOffsetRMSNorm(spec.hidden_size, spec.norm_eps)


FAMILY = ModelFamily(
    name="gemma2",
    model_types=("gemma2",),
    base_prefix="model.",
    block_prefix_template="model.layers.{i}.",
    client_tensor_names=llama.LLAMA_CLIENT_TENSORS,
    spec_from_config=spec_from_config,
    make_block=Gemma2Block,
    make_attn_inputs=llama.make_attn_inputs,
    make_final_norm=make_final_norm,
    lora_targets={**llama.attention_lora_targets(), **llama.mlp_lora_targets()},
    default_lora_targets=("q_proj", "v_proj"),
)
