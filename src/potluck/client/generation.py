"""Token generation loop with transformers' ``generate`` semantics, shared by local and remote models.

The model is abstracted as ``step(new_ids [B, T_new]) -> logits [B, V]`` of the last new position: the first call
gets the whole prompt, later calls one token per row. Everything else — logits processors, sampling with
``torch.multinomial`` on torch's global RNG, eos/pad handling, stop strings, streamer calls — follows
``GenerationMixin._sample`` step for step, so ``torch.manual_seed(s)`` followed by :func:`generate_tokens` yields the
same tokens as ``torch.manual_seed(s)`` followed by HF ``model.generate(do_sample=True, ...)`` on the same logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from potluck.client.beam_search import beam_search_tokens

# step(new_ids) -> logits; beam search calls step(new_ids, hypo_ids) to have the cache rows reordered first
StepFn = Callable[..., torch.Tensor]

# transformers' global defaults for parameters left unset by both the user and the model's generation config
_HF_DEFAULT_MAX_LENGTH = 20
# generate() kwargs that matter to HF's model call, not to token selection; accepted and ignored here
_IGNORED_KWARGS = frozenset({"use_cache", "return_dict_in_generate", "output_scores"})


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters; defaults equal transformers' global defaults (greedy unless ``do_sample``).

    Note that as in HF, ``top_k`` defaults to 50, which applies whenever ``do_sample=True``.
    ``max_new_tokens`` wins over ``max_length`` (total length incl. prompt); if both are None, ``max_length=20``.
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = None  # stored as int or tuple
    pad_token_id: int | None = None
    stop_strings: str | Sequence[str] | None = None  # stored as tuple
    max_length: int | None = None
    num_beams: int = 1  # > 1: beam search (transformers' algorithm), see potluck.client.beam_search
    length_penalty: float = 1.0  # beam search: finished hypotheses score sum(log p) / length**length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as in transformers

    def __post_init__(self) -> None:
        # normalise lists (as found in HF configs) to tuples so the dataclass stays hashable and immutable
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif self.stop_strings is not None:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample) is not supported")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @classmethod
    def from_kwargs(cls, generation_config: Any = None, **kwargs: Any) -> GenerationParams:
        """Resolve parameters like HF ``generate``: kwargs > ``generation_config`` (non-None fields) > defaults.

        ``generation_config`` is a ``transformers.GenerationConfig`` (e.g. ``model.generation_config``) or None.
        Unknown kwargs raise TypeError (strategies not implemented here, e.g. group beam search).
        """
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if generation_config is not None:
            for name in names:
                value = getattr(generation_config, name, None)
                if value is not None:
                    values[name] = value
        for key, value in kwargs.items():
            if key in names:
                values[key] = value
            elif key not in _IGNORED_KWARGS:
                raise TypeError(f"unsupported generation argument {key!r}")
        return cls(**values)

    def eos_ids(self) -> list[int] | None:
        if self.eos_token_id is None:
            return None
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_new_tokens(self, prompt_length: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        max_length = self.max_length if self.max_length is not None else _HF_DEFAULT_MAX_LENGTH
        return max(max_length - prompt_length, 0)


def left_padding(attention_mask: torch.Tensor | None) -> list[int] | None:
    """Per-row count of leading zeros of ``attention_mask [B, T]``; None when no row is padded.

    Only left padding is supported (as transformers recommends for decoder-only generation): every row must be
    zeros followed by ones.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.long).cpu()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got {tuple(mask.shape)}")
    pads = (mask.cumsum(dim=1) == 0).sum(dim=1)  # [B] leading zeros
    positions = torch.arange(mask.shape[1])[None, :]  # [1, T]
    if not torch.equal(mask, (positions >= pads[:, None]).to(torch.long)):
        raise ValueError("attention_mask must be left padding: zeros, then ones, in every row")
    if bool((pads == mask.shape[1]).any()):
        raise ValueError("attention_mask has a row without any token")
    return [int(p) for p in pads] if bool(pads.any()) else None


def build_logits_processors(params: GenerationParams) -> LogitsProcessorList:
    """Same processors, same order as HF ``_get_logits_processor`` for these parameters."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.do_sample:  # "warpers" only apply when sampling
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k is not None and params.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    return processors


def build_stopping_criteria(params: GenerationParams, tokenizer: Any = None) -> StoppingCriteriaList:
    """Per-row stop conditions other than length (the loop bounds length itself)."""
    criteria = StoppingCriteriaList()
    if params.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= to generate_tokens")
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(params.stop_strings)))
    eos_ids = params.eos_ids()
    if eos_ids is not None:
        criteria.append(EosTokenCriteria(eos_token_id=eos_ids))
    return criteria


@torch.no_grad()
def generate_tokens(
    step: StepFn,
    input_ids: torch.Tensor,
    params: GenerationParams,
    *,
    streamer: Any = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate up to ``params`` new tokens after ``input_ids [B, T]``; returns ``[B, T + N]``.

    ``step`` must return logits ``[B, V]`` of the last position it was given (``[B, T_new, V]`` is accepted too).
    Rows that hit eos get ``pad_token_id`` afterwards (defaults to the first eos id, as in HF); the loop ends
    when every row hit eos or a stop string, or after the token budget. ``generator`` (default: torch's global
    RNG, as HF) draws the samples, so concurrent generations can each have their own seeded stream.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
    processors = build_logits_processors(params)
    stopping = build_stopping_criteria(params, tokenizer)
    eos_ids = params.eos_ids()
    pad_token_id = (
        params.pad_token_id if params.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    )
    has_eos = eos_ids is not None
    if params.num_beams > 1:
        if streamer is not None:
            raise ValueError("streamers are not supported with beam search (as in transformers)")
        return beam_search_tokens(
            step,
            input_ids,
            num_beams=params.num_beams,
            max_new_tokens=params.num_new_tokens(input_ids.shape[1]),
            processors=processors,
            stopping=stopping,
            eos_ids=eos_ids,
            pad_token_id=params.pad_token_id,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
        )

    if streamer is not None:
        streamer.put(input_ids.cpu())
    sequences = input_ids  # [B, T + generated]
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)  # [B]
    new_ids = input_ids  # [B, T_new]
    for _ in range(params.num_new_tokens(input_ids.shape[1])):
        logits = step(new_ids)
        if logits.dim() == 3:
            logits = logits[:, -1]  # [B, V]
        logits = logits.to(device=sequences.device, dtype=torch.float32, copy=True)  # [B, V]
        scores = processors(cast(torch.LongTensor, sequences), logits)  # [B, V]
        if params.do_sample:
            probs = torch.softmax(scores, dim=-1)  # [B, V]
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # [B]
        else:
            next_tokens = torch.argmax(scores, dim=-1)  # [B]
        if has_eos:
            assert pad_token_id is not None
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)  # [B]
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)  # [B, T + generated]
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if len(stopping) > 0:
            unfinished = unfinished & ~stopping(cast(torch.LongTensor, sequences), None)  # [B]
            if unfinished.max() == 0:
                break
        new_ids = next_tokens[:, None]  # [B, 1]
    if streamer is not None:
        streamer.end()
    return sequences
