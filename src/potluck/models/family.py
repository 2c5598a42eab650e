"""What a model family is: the one object that knows an architecture's blocks, config, tensor names and LoRA targets.

Each family module (``llama.py``, ``bloom.py``, ``mixtral.py``, ...) builds one :class:`ModelFamily` named
``FAMILY``; :mod:`potluck.models.registry` lists them. Everything else in potluck (loading, client parts, LoRA,
PEFT files, placement) reads these fields and has no per-family branches, so adding a family means one module
plus a registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from potluck.models.layers import AttnInputs
from potluck.models.spec import ModelSpec

# Where the checkpoint keeps one block tensor when not under its own name: another name, or a list (stacked along a
# new dim 0, e.g. experts) of lists of names (concatenated along dim 0, e.g. gate and up projections). Names are
# relative to the block prefix.
TensorSources = list[list[str]]


@dataclass(frozen=True)
class LoraTarget:
    """A projection a LoRA adapter may target inside one block."""

    path: str  # module (or, for stacked experts, parameter) path inside the block, as PEFT names it
    features: Callable[[ModelSpec], tuple[int, int]]  # (in_features, out_features) of the projection
    # Stacked expert weights [E, out, in] (PEFT's ``target_parameters``): A is [E, rank, in] and B [E, out, rank]
    # per block, one adapter per expert.
    experts: Callable[[ModelSpec], int] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """Everything architecture-specific that spans, client parts, LoRA and the loader need."""

    name: str
    model_types: tuple[str, ...]  # HF ``config.model_type`` values this family serves
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
    # LoRA target name (PEFT's target_modules / target_parameters entry) -> where it is; canonical order
    lora_targets: Mapping[str, LoraTarget]
    default_lora_targets: tuple[str, ...]  # what a client adapts when it names no targets
    make_embed_norm: Callable[[ModelSpec], nn.Module] | None = None  # BLOOM's word_embeddings_layernorm
    # Block parameter (state_dict key) -> checkpoint sources, for tensors the checkpoint stores renamed or split up
    # (Mixtral's router and per-expert w1/w3/w2). None for tensors stored under their own name.
    block_tensor_sources: Callable[[ModelSpec, str], str | TensorSources | None] = field(
        default=lambda spec, key: None
    )

    def block_prefix(self, index: int) -> str:
        return self.block_prefix_template.format(i=index)

    def lora_target(self, target: str) -> LoraTarget:
        """The target named ``target``; ValueError naming the valid ones otherwise."""
        found = self.lora_targets.get(target)
        if found is None:
            raise ValueError(
                f"unknown LoRA target {target!r} for model family {self.name!r}; "
                f"valid targets: {', '.join(self.lora_targets)}"
            )
        return found
