"""A normalised, framework-independent description of a model's shapes.

HF configs differ between families (``n_head`` vs ``num_attention_heads``) and between transformers versions
(``rope_scaling`` in 4.x vs ``rope_parameters`` in 5.x). Everything else in ``potluck.models`` reads a
:class:`ModelSpec` instead, so those differences are handled in exactly one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its options) is not implemented by potluck."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding parameters, with the same meaning as in transformers' ``modeling_rope_utils``."""

    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    theta: float = 10000.0
    factor: float = 1.0  # linear / dynamic / llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3
    max_position_embeddings: int = 2048  # dynamic NTK scales only beyond this length


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of a decoder-only transformer, normalised from an HF config."""

    model_type: str  # HF ``config.model_type``, e.g. "llama", "qwen2", "bloom"
    family: str  # potluck family name, e.g. "llama", "bloom"
    num_blocks: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    rope: RopeSpec | None = None  # None for ALiBi models (BLOOM)
    qkv_bias: bool = False  # Qwen2: bias on q/k/v but not on o
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-block sliding attention window (Mistral, Qwen2 with use_sliding_window); None = full causal attention.
    sliding_windows: tuple[int | None, ...] = ()
    apply_residual_connection_post_layernorm: bool = False  # BLOOM option
    pad_token_id: int | None = (
        None  # embedding row without gradient (HF padding_idx); None where HF passes none
    )
    max_position_embeddings: int = 2048
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys before RoPE
    attn_scale: float | None = (
        None  # attention score scale; None = 1/sqrt(head_dim) (Gemma 2: query_pre_attn_scalar)
    )
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before masking
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    embed_scale: float | None = None  # Gemma 2: embeddings multiplied by sqrt(hidden) (in the weights' dtype)
    num_experts: int = 0  # sparse MoE feed-forward (Mixtral): experts per block; 0 = dense MLP
    num_experts_per_tok: int = 0  # MoE: experts each token is routed to (top-k)
    # Family-specific structural flags that no other code reads (e.g. Falcon's new_decoder_architecture).
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """Normalise an HF config; raises :class:`UnsupportedModelError` for unknown architectures."""
        from potluck.models.registry import spec_from_config  # local import: registry imports this module

        return spec_from_config(config)

    def sliding_window(self, block_index: int) -> int | None:
        """Sliding window of block ``block_index`` (absolute index), None if it attends to all past tokens."""
        if not self.sliding_windows:
            return None
        return self.sliding_windows[block_index]

    def kv_bytes_per_token(self, num_blocks: int, dtype_bytes: int) -> int:
        """Bytes of KV cache one token of one sequence occupies over ``num_blocks`` blocks."""
        return 2 * num_blocks * self.num_kv_heads * self.head_dim * dtype_bytes


def rope_spec_from_config(config: Any) -> RopeSpec:
    """Read RoPE settings from either transformers 5 ``rope_parameters`` or legacy ``rope_scaling``."""
    params: dict[str, Any] = {}
    # transformers 5 folds rope_theta and the scaling dict into ``rope_parameters``; 4.x keeps ``rope_theta`` and
    # an optional ``rope_scaling`` dict whose type key is ``type`` (old) or ``rope_type`` (newer).
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(config, attr, None)
        if isinstance(value, dict):
            params.update(value)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    max_pos = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    return RopeSpec(
        rope_type=rope_type,
        theta=float(theta if theta is not None else 10000.0),
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
        max_position_embeddings=max_pos,
    )
