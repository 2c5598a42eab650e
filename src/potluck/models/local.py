"""The whole model in one process: the local baseline for tests and benchmarks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models.client_parts import ClientParts
from potluck.models.family import ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.loading import load_client_parts, load_config, load_span
from potluck.models.lora import LoraWeights
from potluck.models.span import BlockSpan
from potluck.models.spec import ModelSpec


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # scalar


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF causal-LM loss: position t predicts label t+1, mean over non-ignored targets, computed in fp32."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index
    )


class LocalCausalLM(nn.Module):
    """``ClientParts`` + ``BlockSpan(0, num_blocks)`` run in-process."""

    def __init__(self, client: ClientParts, span: BlockSpan) -> None:
        super().__init__()
        if span.start != 0 or span.end != span.spec.num_blocks:
            raise ValueError(f"LocalCausalLM needs all blocks, got span [{span.start}, {span.end})")
        self.client = client
        self.span = span

    @property
    def spec(self) -> ModelSpec:
        return self.span.spec

    @property
    def family(self) -> ModelFamily:
        return self.span.family

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        quant: str = "none",
    ) -> LocalCausalLM:
        hub: dict[str, Any] = {"revision": revision, "token": token, "cache_dir": cache_dir}
        config = load_config(name_or_path, **hub)
        client = load_client_parts(name_or_path, dtype, device, config=config, **hub)
        num_blocks = client.spec.num_blocks
        span = load_span(name_or_path, 0, num_blocks, dtype, device, config=config, quant=quant, **hub)
        return cls(client, span).eval()

    @property
    def device(self) -> torch.device:
        return self.client.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.client.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> CausalLMOutput:
        """Full forward without cache; ``loss`` is set when ``labels [B, T]`` are given (-100 = ignore).

        ``prompts [num_blocks, B or 1, P, hidden]`` are deep prompts and ``lora`` LoRA adapters covering all
        blocks, both passed to :meth:`BlockSpan.forward`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.client.embed(input_ids)  # [B, T, hidden]
        hidden = self.client.pre_blocks(inputs_embeds)  # [B, T, hidden]
        hidden = self.span(hidden, prompts=prompts, lora=lora)  # [B, T, hidden]
        logits = self.client.head(hidden)  # [B, T, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.span.new_cache(batch_size, max_length)

    def step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        lora: LoraWeights | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed new tokens ``[B, T_new]`` through the cache; returns their logits ``[B, T_new, V]``."""
        hidden = self.client.pre_blocks(self.client.embed(input_ids))  # [B, T_new, hidden]
        return self.client.head(self.span(hidden, cache=cache, prompts=prompts, lora=lora))  # [B, T_new, V]

    def generate(
        self,
        input_ids: torch.Tensor,
        generation_config: Any = None,
        *,
        streamer: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF-like ``generate`` over a fresh KV cache (see :mod:`potluck.client.generation`)."""
        from potluck.client.generation import GenerationParams, generate_tokens, left_padding

        pads = left_padding(kwargs.pop("attention_mask", None))  # prompts of different lengths, left-padded
        params = GenerationParams.from_kwargs(generation_config, **kwargs)
        max_length = input_ids.shape[1] + params.num_new_tokens(input_ids.shape[1])
        rows = input_ids.shape[0] * params.num_beams  # beam search keeps num_beams rows per prompt
        cache = self.new_cache(rows, max(max_length, 1))
        cache.set_pads(None if pads is None else [p for p in pads for _ in range(params.num_beams)])

        def step(new_ids: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
            if hypo_ids is not None:
                cache.reorder(hypo_ids)
            return self.step(new_ids.to(self.device), cache)[:, -1]  # [B, V]

        with torch.inference_mode():
            return generate_tokens(step, input_ids, params, streamer=streamer, tokenizer=tokenizer)
