"""Draft models for speculative decoding (``client/speculative.py``): what proposes the tokens the swarm checks.

A draft is anything with ``runner(max_length)`` giving a :class:`CachedLM`: a causal LM over a KV cache that can
be rolled back. Ours run our block code over our cache (:class:`LocalDraft`, optionally int8 or only the first
blocks); any other transformers model runs over a ``DynamicCache`` (:class:`HFDraft`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

from potluck.models.client_parts import ClientParts
from potluck.models.kv_cache import KVCache
from potluck.models.local import LocalCausalLM
from potluck.models.span import BlockSpan


class CachedLM(Protocol):
    """A causal LM with a KV cache that can be rolled back: the draft, and the target as seen by the loop."""

    @property
    def length(self) -> int:
        """Tokens whose keys/values the cache holds."""
        ...

    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        """Feed ``ids [1, T]`` at ``position`` (<= length; later tokens are forgotten); logits ``[1, n, V]`` of
        the last ``n = num_logits`` positions (default all ``T``: the LM head costs as much as a block or two
        per position, and a prompt's positions need none)."""
        ...

    def rollback(self, length: int) -> None:
        """Forget tokens at positions >= ``length``."""
        ...


class DraftModel(Protocol):
    """Anything that gives a fresh :class:`CachedLM` for one generation."""

    def runner(self, max_length: int) -> CachedLM: ...


# --- drafts ------------------------------------------------------------------------------------------------


class SpanRunner:
    """Client parts + a block span (all of a model's blocks, or only its first ones) over our KV cache."""

    def __init__(
        self, client: ClientParts, span: BlockSpan, max_length: int, head: torch.nn.Module | None = None
    ) -> None:
        self.client, self.span = client, span
        self.head: Callable[[torch.Tensor], torch.Tensor] = client.head if head is None else head
        self.cache: KVCache = span.new_cache(1, max_length)

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        self.cache.rollback(position)
        ids = ids.to(self.client.embed_tokens.weight.device)
        hidden = self.span(self.client.pre_blocks(self.client.embed(ids)), cache=self.cache)  # [1, T, H]
        return self.head(hidden if num_logits is None else hidden[:, -num_logits:])  # [1, n, V]

    def rollback(self, length: int) -> None:
        self.cache.rollback(min(length, self.cache.length))


class LocalDraft:
    """A :class:`LocalCausalLM` as draft; ``num_blocks`` keeps only its first blocks (a cheaper, layer-skip draft),
    ``head`` replaces the final norm + LM head (e.g. :class:`Int8Head`)."""

    def __init__(
        self, model: LocalCausalLM, num_blocks: int | None = None, head: torch.nn.Module | None = None
    ) -> None:
        self.model, self.head = model, head
        n = model.span.num_blocks if num_blocks is None else num_blocks
        self.span = model.span if n == model.span.num_blocks else model.span.slice(0, n)

    def runner(self, max_length: int) -> CachedLM:
        return SpanRunner(self.model.client, self.span, max_length, self.head)


def _quantize_linears_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8 per tensor, activations at run time).

    ``torch.ao.quantization`` warns that it moves to torchao; this torch still ships it, and torchao is no
    dependency of ours. Its fbgemm kernels read a quarter of fp32's bytes per token, which is what a
    memory-bound decode step pays for.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


class Int8Head(torch.nn.Module):
    """The final norm + an int8 copy of the LM head (+ soft-capping): ~4x fewer bytes per draft token."""

    def __init__(self, client: ClientParts) -> None:
        super().__init__()
        weight = client.head_weight()  # [V, H]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = torch.nn.Parameter(weight.detach().float(), requires_grad=False)
        self.norm, self.softcap = client.norm, client.spec.final_logit_softcap
        self.proj = _quantize_linears_int8(torch.nn.Sequential(linear))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.norm(hidden).float())  # [B, T, V]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def int8_draft(model: LocalCausalLM, num_blocks: int | None = None) -> LocalDraft:
    """The model itself with its blocks' linear layers and its LM head in int8: a self-speculative draft.

    On CPU it costs ~2.5x less per token than the fp32 model; on the random bench model its proposals agree
    with the fp32 target ~70% of the time (quantisation error flips the argmax of nearly flat logits).
    Replaces ``model.span`` by its quantised copy (pass a model loaded for the draft).
    """
    model.span = cast(BlockSpan, _quantize_linears_int8(model.span))
    return LocalDraft(model, num_blocks=num_blocks, head=Int8Head(model.client))


class HFRunner:
    """A transformers causal LM over a ``DynamicCache`` (``crop`` rolls it back)."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        self.rollback(position)
        out = self.model(input_ids=ids.to(self.model.device), past_key_values=self.cache, use_cache=True)
        logits = cast(torch.Tensor, out.logits)  # [1, T, V]
        return logits if num_logits is None else logits[:, -num_logits:]

    def rollback(self, length: int) -> None:
        if length < self.length:
            # transformers' Cache.crop takes how many tokens to remove, as a negative count (an absolute length
            # is refused)
            self.cache.crop(length - self.length)


class HFDraft:
    """A transformers ``PreTrainedModel`` (any architecture transformers runs) as draft."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def runner(self, max_length: int) -> CachedLM:
        return HFRunner(self.model)


def load_draft(
    draft: Any, *, num_blocks: int | None = None, dtype: torch.dtype = torch.float32
) -> DraftModel:
    """A draft from a checkpoint path / hub name, a :class:`LocalCausalLM`, a transformers model or a draft.

    Checkpoints of the families our block code supports load as :class:`LocalCausalLM` (safetensors, like the
    client parts); others load with transformers. This is what ``potluck generate --draft`` (and the chat / API
    commands) call once, before passing the result as ``assistant_model=`` to ``generate``.
    """
    if isinstance(draft, LocalDraft | HFDraft):
        return draft
    if isinstance(draft, LocalCausalLM):
        return LocalDraft(draft, num_blocks)
    if isinstance(draft, str):
        from potluck.models.spec import UnsupportedModelError

        try:
            return LocalDraft(LocalCausalLM.from_pretrained(draft, dtype=dtype), num_blocks)
        except UnsupportedModelError:
            from transformers import AutoModelForCausalLM

            return HFDraft(AutoModelForCausalLM.from_pretrained(draft, dtype=dtype))
    if hasattr(draft, "runner"):
        return cast(DraftModel, draft)
    if hasattr(draft, "generation_config") and callable(draft):  # a transformers PreTrainedModel
        return HFDraft(draft)
    raise TypeError(f"cannot use {type(draft).__name__} as a draft model")


@torch.no_grad()
def add_weight_noise(model: torch.nn.Module, relative_std: float, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise of ``relative_std`` times each weight tensor's own std, in place (seeded).

    Makes drafts of a chosen quality from the target itself, for tests and ``bench inference --draft-noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.numel() > 1 and param.is_floating_point():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * float(param.float().std()) * relative_std).to(param.dtype))
    return model
