"""BLOOM decoder blocks: LayerNorm, fused QKV attention with ALiBi, tanh-GELU MLP.

ALiBi adds ``slope_h * (key_pos - query_pos)`` to the attention scores. transformers adds ``slope_h * key_pos``
instead; the two differ by a per-row constant, which softmax ignores, and the relative form keeps the bias small
near the diagonal (better in bf16 for long sequences).

The fused ``query_key_value`` projection lays its output out as ``[heads, 3, head_dim]`` (per head: q, k, v),
not ``[3, heads, head_dim]``; we keep the checkpoint's layout and split accordingly. A LoRA update of
``query_key_value`` (PEFT's) is added to the fused output, so it follows the same layout.

Every projection goes through :func:`potluck.models.lora.lora_linear` (client-owned LoRA adapters).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from potluck.models.family import LoraTarget, ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, cached_attention
from potluck.models.lora import BlockLora, lora_linear
from potluck.models.spec import ModelSpec


def spec_from_config(config: Any) -> ModelSpec:
    hidden = config.hidden_size
    num_heads = config.n_head
    return ModelSpec(
        model_type=config.model_type,
        family="bloom",
        num_blocks=config.n_layer,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        vocab_size=config.vocab_size,
        intermediate_size=4 * hidden,
        norm_eps=float(config.layer_norm_epsilon),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        hidden_act="bloom_gelu",
        rope=None,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        apply_residual_connection_post_layernorm=bool(config.apply_residual_connection_post_layernorm),
        max_position_embeddings=int(getattr(config, "seq_length", 2048) or 2048),
    )


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes ``[H]`` (geometric sequence; interleaved extension for non-power-of-2 heads)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(
        torch.tensor(base, device=device, dtype=torch.float32),
        torch.arange(1, 1 + closest, device=device, dtype=torch.int32),
    )  # [closest]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        num_extra = min(closest, num_heads - closest)
        extra = torch.pow(
            torch.tensor(extra_base, device=device, dtype=torch.float32),
            torch.arange(1, 1 + 2 * num_extra, 2, device=device, dtype=torch.int32),
        )  # [num_extra]
        slopes = torch.cat([slopes, extra])  # [H]
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's tanh approximation with its own rounded constant (not exactly F.gelu(approximate="tanh")).
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.query_key_value = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=True)
        self.dense = nn.Linear(spec.hidden_size, spec.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None,
        cache_index: int,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        fused = lora_linear(self.query_key_value, x, lora, "query_key_value")  # [B, T, 3*hidden]
        fused = fused.view(bsz, seq, self.num_heads, 3, self.head_dim)  # [B, T, H, 3, D]
        q = fused[..., 0, :].transpose(1, 2)  # [B, H, T, D]
        k = fused[..., 1, :].transpose(1, 2)  # [B, H, T, D]
        v = fused[..., 2, :].transpose(1, 2)  # [B, H, T, D]
        out = cached_attention(q, k, v, inputs, cache, cache_index)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # [B, T, hidden]
        return lora_linear(self.dense, out, lora, "dense")  # [B, T, hidden]


class BloomMLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        up = lora_linear(self.dense_h_to_4h, x, lora, "dense_h_to_4h")  # [B, T, 4*hidden]
        return lora_linear(self.dense_4h_to_h, bloom_gelu(up), lora, "dense_4h_to_h")  # [B, T, hidden]


class BloomBlock(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.self_attention = BloomAttention(spec)
        self.post_attention_layernorm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.mlp = BloomMLP(spec)
        self.post_ln_residual = spec.apply_residual_connection_post_layernorm

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None = None,
        cache_index: int = 0,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        ln = self.input_layernorm(x)  # [B, T, hidden]
        residual = ln if self.post_ln_residual else x
        h = residual + self.self_attention(ln, inputs, cache, cache_index, lora)  # [B, T, hidden]
        ln = self.post_attention_layernorm(h)  # [B, T, hidden]
        residual = ln if self.post_ln_residual else h
        return residual + self.mlp(ln, lora)  # [B, T, hidden]


def make_attn_inputs(
    spec: ModelSpec,
    offset: int,
    q_len: int,
    device: torch.device,
    dtype: torch.dtype,
    pads: torch.Tensor | None = None,
) -> AttnInputs:
    kv_len = offset + q_len
    q_pos = torch.arange(offset, kv_len, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, S]
    # relative distances need no per-row shift for left padding: (k - pad) - (q - pad) = k - q
    distance = (k_pos - q_pos).float()  # [T, S], <= 0 where visible
    bias = alibi_slopes(spec.num_heads, device)[:, None, None] * distance  # [H, T, S]
    bias = bias.masked_fill(k_pos > q_pos, float("-inf"))[None]  # [1, H, T, S]
    if pads is not None:
        # hide each row's padding keys (a padding query still sees itself: no empty softmax row)
        hidden = (k_pos < pads.to(device)[:, None, None]) & (k_pos != q_pos)  # [B, T, S]
        bias = bias.masked_fill(hidden[:, None], float("-inf"))  # [B, H, T, S]
    return AttnInputs(offset=offset, q_len=q_len, bias=bias.to(dtype), device=device, pads=pads)


def make_final_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)


def make_embed_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)


FAMILY = ModelFamily(
    name="bloom",
    model_types=("bloom",),
    base_prefix="transformer.",
    block_prefix_template="transformer.h.{i}.",
    client_tensor_names={
        "embed_tokens.weight": "transformer.word_embeddings.weight",
        "embed_norm.weight": "transformer.word_embeddings_layernorm.weight",
        "embed_norm.bias": "transformer.word_embeddings_layernorm.bias",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    spec_from_config=spec_from_config,
    make_block=BloomBlock,
    make_attn_inputs=make_attn_inputs,
    make_final_norm=make_final_norm,
    make_embed_norm=make_embed_norm,
    lora_targets={
        "query_key_value": LoraTarget(
            "self_attention.query_key_value", lambda s: (s.hidden_size, 3 * s.hidden_size)
        ),
        "dense": LoraTarget("self_attention.dense", lambda s: (s.hidden_size, s.hidden_size)),
        "dense_h_to_4h": LoraTarget("mlp.dense_h_to_4h", lambda s: (s.hidden_size, s.intermediate_size)),
        "dense_4h_to_h": LoraTarget("mlp.dense_4h_to_h", lambda s: (s.intermediate_size, s.hidden_size)),
    },
    default_lora_targets=("query_key_value",),
)
