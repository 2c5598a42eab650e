"""A contiguous run of transformer blocks: the unit a server holds and serves."""

from __future__ import annotations

import torch
from torch import nn

from potluck.models.family import ModelFamily
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, PackedMember
from potluck.models.lora import LoraWeights
from potluck.models.spec import ModelSpec


class BlockSpan(nn.Module):
    """Blocks ``start..end-1`` (absolute indices) of a model.

    ``forward(hidden)`` without a cache runs positions ``0..T-1`` with causal attention and supports autograd
    (training, prompt tuning). With a cache the new tokens sit at positions ``cache.length..cache.length+T-1``:
    their keys/values are written into the cache, attention covers the cached prefix plus the new tokens, and
    ``cache.length`` advances by ``T`` after all blocks ran.
    """

    def __init__(
        self,
        spec: ModelSpec,
        family: ModelFamily,
        start: int,
        end: int,
        blocks: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        check_block_range(spec, start, end)
        self.spec = spec
        self.family = family
        self.start = start
        self.end = end
        if blocks is None:
            blocks = nn.ModuleList(family.make_block(spec, i) for i in range(start, end))
        if len(blocks) != end - start:
            raise ValueError(f"expected {end - start} blocks for span [{start}, {end}), got {len(blocks)}")
        self.blocks = blocks

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return f"model_type={self.spec.model_type}, start={self.start}, end={self.end}"

    def _param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The compute dtype and device: those of the first floating-point parameter (quantized layers hold
        int8 / packed uint8 weights, the norms keep the span's dtype)."""
        param = next(p for p in self.parameters() if p.is_floating_point())
        return param.dtype, param.device

    @property
    def dtype(self) -> torch.dtype:
        return self._param_dtype_device()[0]

    @property
    def device(self) -> torch.device:
        return self._param_dtype_device()[1]

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> torch.Tensor:
        """Run ``hidden [B, T, hidden]`` through the blocks; returns ``[B, T, hidden]``.

        ``prompts [num_blocks, B or 1, P, hidden]`` (deep prompt tuning): before block ``i``, ``prompts[i]`` is
        added to the hidden states at absolute positions ``0..P-1`` (only the part of those positions that this
        call covers, so a cached decode step past the prefix is unaffected).

        ``lora`` adds LoRA adapters to the blocks' target projections; it must cover at least ``[start, end)``
        (absolute block indices; a wider one is sliced, keeping autograd to the caller's tensors).
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.spec.hidden_size:
            raise ValueError(
                f"hidden must be [batch, seq, {self.spec.hidden_size}], got {tuple(hidden.shape)}"
            )
        bsz, seq, _ = hidden.shape
        offset = 0
        if cache is not None:
            if cache.num_blocks != self.num_blocks:
                raise ValueError(f"cache holds {cache.num_blocks} blocks, span has {self.num_blocks}")
            if cache.batch_size != bsz:
                raise ValueError(f"cache batch size {cache.batch_size} != hidden batch size {bsz}")
            if cache.dtype != hidden.dtype:
                raise ValueError(f"cache dtype {cache.dtype} != hidden dtype {hidden.dtype}")
            cache.check_room(seq)
            offset = cache.length
        if lora is not None:
            lora = self._lora_for_span(lora)
        if seq == 0:
            return hidden
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != self.num_blocks):
            raise ValueError(
                f"prompts must be [{self.num_blocks}, batch, prefix_len, hidden], got {tuple(prompts.shape)}"
            )

        inputs = self._attn_inputs(offset, seq, hidden, cache)
        for i, block in enumerate(self.blocks):
            if prompts is not None:
                hidden = _add_prompt(hidden, prompts[i], offset)  # [B, T, hidden]
            block_lora = lora.block(i) if lora is not None else None
            hidden = block(hidden, inputs, cache, i, block_lora)  # [B, T, hidden]
        if cache is not None:
            cache.advance(seq)
        return hidden

    def _attn_inputs(self, offset: int, seq: int, hidden: torch.Tensor, cache: KVCache | None) -> AttnInputs:
        if cache is not None and cache.pads is not None:
            return self.family.make_attn_inputs(
                self.spec, offset, seq, hidden.device, hidden.dtype, pads=cache.pads
            )
        return self.family.make_attn_inputs(self.spec, offset, seq, hidden.device, hidden.dtype)

    def forward_packed(
        self, items: list[tuple[torch.Tensor, KVCache]], lora: LoraWeights | None = None
    ) -> list[torch.Tensor]:
        """Run several sessions' new tokens ``[B_i, T_i, hidden]``, each on its own cache, as ONE forward.

        The rows are packed into one sequence ``[1, sum B_i*T_i, hidden]``: norms, projections and MLPs (the
        weight-streaming, memory-bound part of a decode step) run once for everyone, while each session's
        attention covers only its own cache with its own positions and padding. Sessions may hold different
        lengths and feed different numbers of tokens (decode steps beside a prefill chunk). ``lora`` is shared
        by all (the server groups sessions by adapter); deep prompts are not supported here.
        """
        if not items:
            return []
        if lora is not None:
            lora = self._lora_for_span(lora)
        members: list[PackedMember] = []
        packed: list[torch.Tensor] = []
        cos: list[torch.Tensor] = []
        sin: list[torch.Tensor] = []
        lo = 0
        for hidden, cache in items:
            if hidden.dim() != 3 or hidden.shape[-1] != self.spec.hidden_size or hidden.shape[1] == 0:
                raise ValueError(
                    f"packed hidden states must be [batch, seq>0, hidden], got {tuple(hidden.shape)}"
                )
            if cache.num_blocks != self.num_blocks or cache.batch_size != hidden.shape[0]:
                raise ValueError(
                    "each packed session needs its own cache of this span with the same batch size"
                )
            bsz, seq, _ = hidden.shape
            cache.check_room(seq)
            inputs = self._attn_inputs(cache.length, seq, hidden, cache)
            members.append(PackedMember(cache, lo, lo + bsz * seq, bsz, seq, inputs))
            packed.append(hidden.reshape(bsz * seq, -1))  # [B*T, hidden], row-major
            if inputs.cos is not None and inputs.sin is not None:
                cos.append(inputs.cos.expand(bsz, 1, seq, -1).reshape(bsz * seq, -1))  # [B*T, D]
                sin.append(inputs.sin.expand(bsz, 1, seq, -1).reshape(bsz * seq, -1))  # [B*T, D]
            lo += bsz * seq
        x = torch.cat(packed)[None]  # [1, N, hidden]
        first = members[0].inputs
        shared = AttnInputs(
            offset=first.offset,
            q_len=lo,
            cos=torch.cat(cos) if cos else None,  # [N, D]: every packed token's own rotary position
            sin=torch.cat(sin) if sin else None,
            device=first.device,
            members=members,
        )
        for i, block in enumerate(self.blocks):
            block_lora = lora.block(i) if lora is not None else None
            x = block(x, shared, None, i, block_lora)  # [1, N, hidden]
        for m in members:
            m.cache.advance(m.q_len)
        return [x[0, m.lo : m.hi].reshape(m.batch, m.q_len, -1) for m in members]  # each [B_i, T_i, hidden]

    def _lora_for_span(self, lora: LoraWeights) -> LoraWeights:
        """``lora`` restricted to this span's blocks, checked against the model's shapes."""
        if not isinstance(lora, LoraWeights):
            raise TypeError(f"lora must be a LoraWeights, got {type(lora).__name__}")
        if not lora.start <= self.start < self.end <= lora.end:
            raise ValueError(
                f"LoRA covers blocks [{lora.start}, {lora.end}), which does not include this span's blocks "
                f"[{self.start}, {self.end})"
            )
        lora = lora.slice(self.start, self.end)
        lora.check_spec(self.spec)
        return lora

    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Allocate a cache for this span; dtype/device default to the span's parameters."""
        param_dtype, param_device = self._param_dtype_device()
        return KVCache.allocate(
            self.spec,
            self.num_blocks,
            batch_size,
            max_length,
            dtype=dtype or param_dtype,
            device=device if device is not None else param_device,
        )

    def slice(self, start: int, end: int) -> BlockSpan:
        """A span over blocks ``start..end-1`` (absolute indices) sharing this span's parameters."""
        if not self.start <= start < end <= self.end:
            raise ValueError(
                f"slice [{start}, {end}) is not a non-empty sub-range of [{self.start}, {self.end})"
            )
        blocks = nn.ModuleList(self.blocks[start - self.start : end - self.start])
        return BlockSpan(self.spec, self.family, start, end, blocks)


def check_block_range(spec: ModelSpec, start: int, end: int) -> None:
    """Raise ValueError unless ``0 <= start < end <= spec.num_blocks``."""
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= spec.num_blocks:
        raise ValueError(
            f"invalid block range [{start}, {end}): need 0 <= start < end <= num_blocks ({spec.num_blocks})"
        )


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, offset: int) -> torch.Tensor:
    """Add ``prompt [B, P, H]`` to the positions of ``hidden [B, T, H]`` that fall in ``0..P-1``."""
    prefix_len = prompt.shape[1]
    if offset >= prefix_len:
        return hidden
    n = min(prefix_len - offset, hidden.shape[1])
    head = hidden[:, :n] + prompt[:, offset : offset + n].to(hidden.dtype)  # [B, n, H]
    # out-of-place so autograd reaches both the hidden states and the prompts
    return torch.cat([head, hidden[:, n:]], dim=1)  # [B, T, H]
