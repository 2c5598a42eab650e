"""The list of model families, and lookup by HF ``model_type``.

Adding a family: write its module (blocks, config mapping, tensor names, LoRA targets; see
:class:`potluck.models.family.ModelFamily`) and add its ``FAMILY`` to :data:`FAMILIES` below.
"""

from __future__ import annotations

from typing import Any

from potluck.models import bloom, falcon, gemma2, llama, mixtral, qwen3
from potluck.models.family import ModelFamily
from potluck.models.spec import ModelSpec, UnsupportedModelError

__all__ = [
    "FAMILIES",
    "LORA_TARGETS",
    "SUPPORTED_MODEL_TYPES",
    "ModelFamily",
    "UnsupportedModelError",
    "family_by_name",
    "get_family",
]

FAMILIES: tuple[ModelFamily, ...] = (
    llama.FAMILY,
    bloom.FAMILY,
    qwen3.FAMILY,
    gemma2.FAMILY,
    mixtral.FAMILY,
    falcon.FAMILY,
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
_BY_NAME = {family.name: family for family in FAMILIES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))
# Projections a LoRA adapter may target, per family, in canonical order (the names PEFT's configs use).
LORA_TARGETS: dict[str, tuple[str, ...]] = {f.name: tuple(f.lora_targets) for f in FAMILIES}


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


def family_by_name(name: str) -> ModelFamily:
    """Family called ``name`` (``ModelSpec.family``); ValueError naming the known ones otherwise."""
    family = _BY_NAME.get(name)
    if family is None:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(_BY_NAME)}")
    return family


def spec_from_config(config: Any) -> ModelSpec:
    """Normalised :class:`ModelSpec` for an HF config (raises :class:`UnsupportedModelError`)."""
    return get_family(config).spec_from_config(config)
