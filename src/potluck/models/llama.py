"""Llama-style decoder blocks: Llama 2/3/3.1, Mistral, Qwen2.

Pre-norm RMSNorm blocks with rotary attention (MHA or GQA) and a gated SiLU MLP. Differences handled here:

* Qwen2 has biases on q/k/v (not on o); Llama's ``attention_bias`` puts biases on all four projections.
* Mistral (and Qwen2 with ``use_sliding_window``) restrict attention to a sliding window. We keep a full KV cache
  and mask keys older than the window, which gives exactly transformers' results (HF's sliding cache only
  drops keys that the mask hides anyway); at lengths below the window this is plain causal attention.
* RoPE scaling types default / linear / dynamic / llama3 (see :func:`potluck.models.layers.rope_inv_freq`).

Every projection goes through :func:`potluck.models.lora.lora_linear`, so a block can apply client-owned LoRA
adapters (``lora=BlockLora``) to any of q/k/v/o/gate/up/down_proj.

Parameter names inside a block match the HF checkpoint names after the ``model.layers.{i}.`` prefix, so a block's
``state_dict`` keys tell the loader which tensors to read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models.family import LoraTarget, ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, RMSNorm, apply_rope, cached_attention, rope_cos_sin
from potluck.models.lora import BlockLora, lora_linear
from potluck.models.spec import ModelSpec, UnsupportedModelError, rope_spec_from_config

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def spec_from_config(config: Any) -> ModelSpec:
    model_type = config.model_type
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_blocks = config.num_hidden_layers
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {hidden_act!r} is not supported")

    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))

    windows: tuple[int | None, ...] = ()
    sliding_window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and sliding_window is not None:
        windows = (int(sliding_window),) * num_blocks
    elif model_type == "qwen2" and sliding_window is not None:
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_blocks
        windows = tuple(int(sliding_window) if t == "sliding_attention" else None for t in layer_types)

    return ModelSpec(
        model_type=model_type,
        family="llama",
        num_blocks=num_blocks,
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        intermediate_size=config.intermediate_size,
        norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        hidden_act=hidden_act,
        rope=rope_spec_from_config(config),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        sliding_windows=windows,
        pad_token_id=getattr(config, "pad_token_id", None),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048) or 2048),
    )


class LlamaAttention(nn.Module):
    """Rotary attention with separate q/k/v/o projections; shared by the Llama-like families.

    Generic options from the spec: ``qk_norm`` (Qwen3's RMSNorm over head_dim on q and k before RoPE),
    ``attn_scale`` and ``attn_softcap`` (Gemma 2).
    """

    def __init__(self, spec: ModelSpec, window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window = window
        self.scale, self.softcap = spec.attn_scale, spec.attn_softcap
        hidden = spec.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=spec.o_bias)
        self.q_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None,
        cache_index: int,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = lora_linear(self.q_proj, x, lora, "q_proj")  # [B, T, H*D]
        k = lora_linear(self.k_proj, x, lora, "k_proj")  # [B, T, KVH*D]
        v = lora_linear(self.v_proj, x, lora, "v_proj")  # [B, T, KVH*D]
        q = q.view(bsz, seq, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim)  # [B, T, KVH, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # [B, H, T, D]
        k = k.transpose(1, 2)  # [B, KVH, T, D]
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        assert inputs.cos is not None and inputs.sin is not None
        q = apply_rope(q, inputs.cos, inputs.sin)  # [B, H, T, D]
        k = apply_rope(k, inputs.cos, inputs.sin)  # [B, KVH, T, D]
        out = cached_attention(
            q, k, v, inputs, cache, cache_index, self.window, self.scale, self.softcap
        )  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # [B, T, H*D]
        return lora_linear(self.o_proj, out, lora, "o_proj")  # [B, T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        gate = lora_linear(self.gate_proj, x, lora, "gate_proj")  # [B, T, I]
        up = lora_linear(self.up_proj, x, lora, "up_proj")  # [B, T, I]
        return lora_linear(self.down_proj, self.act(gate) * up, lora, "down_proj")  # [B, T, hidden]


class LlamaBlock(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec, spec.sliding_window(index))
        self.mlp = LlamaMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttnInputs,
        cache: KVCache | None = None,
        cache_index: int = 0,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), inputs, cache, cache_index, lora)  # [B, T, hidden]
        return h + self.mlp(self.post_attention_layernorm(h), lora)  # [B, T, hidden]


def make_attn_inputs(
    spec: ModelSpec,
    offset: int,
    q_len: int,
    device: torch.device,
    dtype: torch.dtype,
    pads: torch.Tensor | None = None,
) -> AttnInputs:
    assert spec.rope is not None
    # [T, D] each, or [B, 1, T, D] with per-row positions when rows are left-padded
    cos, sin = rope_cos_sin(spec.rope, spec.head_dim, offset, q_len, device, dtype, pads)
    return AttnInputs(offset=offset, q_len=q_len, cos=cos, sin=sin, device=device, pads=pads)


def make_final_norm(spec: ModelSpec) -> nn.Module:
    return RMSNorm(spec.hidden_size, spec.norm_eps)


def attention_lora_targets() -> dict[str, LoraTarget]:
    """q/k/v/o_proj of :class:`LlamaAttention` (``self_attn.*``), shared by the Llama-like families."""

    def q_out(spec: ModelSpec) -> int:
        return spec.num_heads * spec.head_dim

    def kv_out(spec: ModelSpec) -> int:
        return spec.num_kv_heads * spec.head_dim

    return {
        "q_proj": LoraTarget("self_attn.q_proj", lambda s: (s.hidden_size, q_out(s))),
        "k_proj": LoraTarget("self_attn.k_proj", lambda s: (s.hidden_size, kv_out(s))),
        "v_proj": LoraTarget("self_attn.v_proj", lambda s: (s.hidden_size, kv_out(s))),
        "o_proj": LoraTarget("self_attn.o_proj", lambda s: (q_out(s), s.hidden_size)),
    }


def mlp_lora_targets() -> dict[str, LoraTarget]:
    """gate/up/down_proj of :class:`LlamaMLP` (``mlp.*``)."""
    return {
        "gate_proj": LoraTarget("mlp.gate_proj", lambda s: (s.hidden_size, s.intermediate_size)),
        "up_proj": LoraTarget("mlp.up_proj", lambda s: (s.hidden_size, s.intermediate_size)),
        "down_proj": LoraTarget("mlp.down_proj", lambda s: (s.intermediate_size, s.hidden_size)),
    }


LLAMA_CLIENT_TENSORS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

FAMILY = ModelFamily(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    base_prefix="model.",
    block_prefix_template="model.layers.{i}.",
    client_tensor_names=LLAMA_CLIENT_TENSORS,
    spec_from_config=spec_from_config,
    make_block=LlamaBlock,
    make_attn_inputs=make_attn_inputs,
    make_final_norm=make_final_norm,
    lora_targets={**attention_lora_targets(), **mlp_lora_targets()},
    default_lora_targets=("q_proj", "v_proj"),
)
