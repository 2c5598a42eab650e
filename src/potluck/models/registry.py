"""Map HF ``model_type`` to a potluck model family: how to build its blocks and where its tensors live."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from potluck.models import bloom, llama
from potluck.models.layers import AttnInputs
from potluck.models.spec import ModelSpec, UnsupportedModelError

__all__ = ["ModelFamily", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES", "get_family", "FAMILIES"]


@dataclass(frozen=True)
class ModelFamily:
    """Everything architecture-specific that spans, client parts and the loader need."""

    name: str
    model_types: tuple[str, ...]
    # Prefix of the base model in ``*ForCausalLM`` checkpoints; checkpoints saved from the base model lack it.
    base_prefix: str
    block_prefix_template: str  # tensor-name prefix of block i, e.g. "model.layers.{i}."
    # ClientParts parameter name -> checkpoint tensor name (lm_head is skipped when embeddings are tied)
    client_tensor_names: Mapping[str, str]
    spec_from_config: Callable[[Any], ModelSpec]
    make_block: Callable[[ModelSpec, int], nn.Module]  # (spec, absolute block index) -> block
    # (spec, offset, q_len, device, dtype[, pads=[B] left padding per row]) -> AttnInputs
    make_attn_inputs: Callable[..., AttnInputs]
    make_final_norm: Callable[[ModelSpec], nn.Module]
    make_embed_norm: Callable[[ModelSpec], nn.Module] | None = None  # BLOOM's word_embeddings_layernorm

    def block_prefix(self, index: int) -> str:
        return self.block_prefix_template.format(i=index)


LLAMA = ModelFamily(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    base_prefix="model.",
    block_prefix_template="model.layers.{i}.",
    client_tensor_names={
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    spec_from_config=llama.spec_from_config,
    make_block=llama.LlamaBlock,
    make_attn_inputs=llama.make_attn_inputs,
    make_final_norm=llama.make_final_norm,
)

BLOOM = ModelFamily(
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
    spec_from_config=bloom.spec_from_config,
    make_block=bloom.BloomBlock,
    make_attn_inputs=bloom.make_attn_inputs,
    make_final_norm=bloom.make_final_norm,
    make_embed_norm=bloom.make_embed_norm,
)

FAMILIES: tuple[ModelFamily, ...] = (LLAMA, BLOOM)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def get_family(config: Any) -> ModelFamily:
    """Family for an HF config (or anything with ``model_type``, or the model_type string itself)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by potluck; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return family


def spec_from_config(config: Any) -> ModelSpec:
    """Normalised :class:`ModelSpec` for an HF config (raises :class:`UnsupportedModelError`)."""
    return get_family(config).spec_from_config(config)
