"""Model layer: block spans, client parts, KV cache and checkpoint loading for supported architectures."""

from potluck.models.client_parts import ClientParts
from potluck.models.kv_cache import KVCache, KVCacheOverflowError
from potluck.models.loading import CheckpointError, load_client_parts, load_config, load_span
from potluck.models.local import CausalLMOutput, LocalCausalLM
from potluck.models.lora import LoraConfig, LoraWeights
from potluck.models.peft_format import load_peft_adapter, save_peft_adapter
from potluck.models.registry import (
    LORA_TARGETS,
    SUPPORTED_MODEL_TYPES,
    ModelFamily,
    family_by_name,
    get_family,
)
from potluck.models.span import BlockSpan
from potluck.models.spec import ModelSpec, RopeSpec, UnsupportedModelError

__all__ = [
    "LORA_TARGETS",
    "SUPPORTED_MODEL_TYPES",
    "BlockSpan",
    "CausalLMOutput",
    "CheckpointError",
    "ClientParts",
    "KVCache",
    "KVCacheOverflowError",
    "LocalCausalLM",
    "LoraConfig",
    "LoraWeights",
    "ModelFamily",
    "ModelSpec",
    "RopeSpec",
    "UnsupportedModelError",
    "family_by_name",
    "get_family",
    "load_client_parts",
    "load_config",
    "load_peft_adapter",
    "load_span",
    "save_peft_adapter",
]
