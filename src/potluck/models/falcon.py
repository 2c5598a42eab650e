"""Falcon (RoPE variants: 7B, 40B, 180B, 11B and the like): fused QKV attention, LayerNorms, GELU MLP.

The config flags and what they change here:

* ``new_decoder_architecture`` (40B/180B/11B): QKV laid out per KV group as ``[kv_heads, q_per_kv + 2, head_dim]``
  (the group's queries, then its key and value), ``num_kv_heads`` KV heads (GQA), attention and MLP in
  parallel. ``num_ln_in_parallel_attn`` 2 (the default there) gives them separate norms ``ln_attn``/``ln_mlp``,
  1 a shared ``input_layernorm``. transformers broadcasts K/V to every head before caching; we cache the
  ``num_kv_heads`` heads only (same results, a fraction of the memory).
* ``multi_query`` without the new architecture (7B): QKV is ``[heads + 2, head_dim]``, one shared K/V head.
* neither: QKV per head as ``[heads, 3, head_dim]`` (BLOOM's layout), full multi-head attention.
* ``parallel_attn``: ``x + (mlp(ln(x)) + attn(ln(x)))`` with one norm; otherwise sequential with
  ``post_attention_layernorm``.
* ``bias`` on every linear layer; ``alibi`` (falcon-rw) is not supported, only rotary models.

Parameter names match the checkpoint after ``transformer.h.{i}.``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models import llama
from potluck.models.family import LoraTarget, ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, apply_rope, cached_attention
from potluck.models.lora import BlockLora, lora_linear
from potluck.models.spec import ModelSpec, UnsupportedModelError, rope_spec_from_config

_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def spec_from_config(config: Any) -> ModelSpec:
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(
            "Falcon with alibi=True (falcon-rw) is not supported; only rotary Falcon models"
        )
    act = getattr(config, "activation", "gelu")
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"Falcon activation {act!r} is not supported")
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    new_arch = bool(config.new_decoder_architecture)
    parallel = bool(config.parallel_attn)
    num_ln = getattr(config, "num_ln_in_parallel_attn", None) or (2 if new_arch else 1)
    if new_arch and not parallel:
        raise UnsupportedModelError("Falcon new_decoder_architecture without parallel_attn is not supported")
    if new_arch:
        kv_heads, qkv_layout = int(config.num_kv_heads), "grouped"
    elif config.multi_query:
        kv_heads, qkv_layout = 1, "multi_query"
    else:
        kv_heads, qkv_layout = heads, "interleaved"
    bias = bool(config.bias)
    return ModelSpec(
        model_type=config.model_type,
        family="falcon",
        num_blocks=int(config.num_hidden_layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=int(config.vocab_size),
        intermediate_size=int(getattr(config, "ffn_hidden_size", None) or 4 * hidden),
        norm_eps=float(config.layer_norm_epsilon),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        hidden_act=act,
        rope=rope_spec_from_config(config),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048) or 2048),
        # qkv_layout: grouped | multi_query | interleaved; separate_norms: ln_attn + ln_mlp (new architecture)
        options={
            "qkv_layout": qkv_layout,
            "parallel_attn": parallel,
            "separate_norms": new_arch and num_ln == 2,
        },
    )


def _qkv_features(spec: ModelSpec) -> int:
    return (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim


class FalconAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.layout = spec.options["qkv_layout"]
        self.query_key_value = nn.Linear(spec.hidden_size, _qkv_features(spec), bias=spec.qkv_bias)
        self.dense = nn.Linear(spec.hidden_size, spec.hidden_size, bias=spec.o_bias)

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T, (H + 2*KVH) * D]`` -> q ``[B, T, H, D]``, k and v ``[B, T, KVH, D]`` per the checkpoint's layout."""
        bsz, seq, _ = fused.shape
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.layout == "grouped":
            groups = fused.view(bsz, seq, kvh, h // kvh + 2, d)  # [B, T, KVH, G+2, D]
            return groups[:, :, :, :-2].reshape(bsz, seq, h, d), groups[:, :, :, -2], groups[:, :, :, -1]
        if self.layout == "multi_query":
            heads = fused.view(bsz, seq, h + 2, d)  # [B, T, H+2, D]
            return heads[:, :, :h], heads[:, :, h : h + 1], heads[:, :, h + 1 :]
        per_head = fused.view(bsz, seq, h, 3, d)  # [B, T, H, 3, D]
        return per_head[..., 0, :], per_head[..., 1, :], per_head[..., 2, :]

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None,
        cache_index: int,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self.split(lora_linear(self.query_key_value, x, lora, "query_key_value"))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|KVH, T, D]
        assert inputs.cos is not None and inputs.sin is not None
        q = apply_rope(q, inputs.cos, inputs.sin)  # [B, H, T, D]
        k = apply_rope(k, inputs.cos, inputs.sin)  # [B, KVH, T, D]
        out = cached_attention(q, k, v, inputs, cache, cache_index)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # [B, T, hidden]
        return lora_linear(self.dense, out, lora, "dense")  # [B, T, hidden]


class FalconMLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.dense_4h_to_h = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        up = self.act(lora_linear(self.dense_h_to_4h, x, lora, "dense_h_to_4h"))  # [B, T, I]
        return lora_linear(self.dense_4h_to_h, up, lora, "dense_4h_to_h")  # [B, T, hidden]


class FalconBlock(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        hidden, eps = spec.hidden_size, spec.norm_eps
        self.parallel = bool(spec.options["parallel_attn"])
        self.self_attention = FalconAttention(spec)
        self.mlp = FalconMLP(spec)
        if spec.options["separate_norms"]:
            self.ln_attn = nn.LayerNorm(hidden, eps=eps)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
            if not self.parallel:
                self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None = None,
        cache_index: int = 0,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        if hasattr(self, "ln_attn"):
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)  # [B, T, hidden] each
        else:
            attn_in = mlp_in = self.input_layernorm(x)  # [B, T, hidden]
        attn = self.self_attention(attn_in, inputs, cache, cache_index, lora)  # [B, T, hidden]
        if self.parallel:
            return x + (self.mlp(mlp_in, lora) + attn)  # transformers' order of additions
        h = x + attn  # [B, T, hidden]
        return h + self.mlp(self.post_attention_layernorm(h), lora)  # [B, T, hidden]


def make_final_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)


FAMILY = ModelFamily(
    name="falcon",
    model_types=("falcon",),
    base_prefix="transformer.",
    block_prefix_template="transformer.h.{i}.",
    client_tensor_names={
        "embed_tokens.weight": "transformer.word_embeddings.weight",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    spec_from_config=spec_from_config,
    make_block=FalconBlock,
    make_attn_inputs=llama.make_attn_inputs,
    make_final_norm=make_final_norm,
    lora_targets={
        "query_key_value": LoraTarget(
            "self_attention.query_key_value", lambda s: (s.hidden_size, _qkv_features(s))
        ),
        "dense": LoraTarget("self_attention.dense", lambda s: (s.hidden_size, s.hidden_size)),
        "dense_h_to_4h": LoraTarget("mlp.dense_h_to_4h", lambda s: (s.hidden_size, s.intermediate_size)),
        "dense_4h_to_h": LoraTarget("mlp.dense_4h_to_h", lambda s: (s.intermediate_size, s.hidden_size)),
    },
    default_lora_targets=("query_key_value",),
)
