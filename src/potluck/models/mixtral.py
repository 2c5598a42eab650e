"""Mixtral: Mistral attention with a sparse mixture-of-experts feed-forward (router, top-k of E experts).

Routing is exactly transformers' ``MixtralTopKRouter``: softmax over the router logits in fp32, the top-k
probabilities renormalised to sum to 1, each chosen expert's output scaled by its weight (in fp32, then cast).

Experts are stacked (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, transformers 5's layout) so that all
of them stay resident and a batch runs as grouped matmuls: for a few tokens (decode) each token gathers its
experts' weights and one batched matmul runs them (gpt-fast's mixtral-moe); for many tokens (prefill, training)
tokens are sorted by expert and each expert runs one matmul over its group. Checkpoints on the hub (and
``save_pretrained``'s default) store ``block_sparse_moe.experts.{e}.w1/w3/w2`` per expert; the loader stacks
them (:func:`block_tensor_sources`), and also reads checkpoints already in the stacked layout.

LoRA: attention projections like Llama, plus the experts (PEFT's ``target_parameters``
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``): one rank-r adapter per expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models import llama
from potluck.models.family import LoraTarget, ModelFamily, TensorSources
from potluck.models.kv_cache import KVCache
from potluck.models.layers import AttnInputs, RMSNorm
from potluck.models.lora import BlockLora
from potluck.models.spec import ModelSpec, UnsupportedModelError

# Up to this many (token, expert) pairs, gather each pair's expert weights (decode); above, group by expert.
GATHER_MAX_PAIRS = 8

# LoRA target names of the stacked experts (PEFT target_parameters end in these; ParameterDict keys have no ".")
GATE_UP, DOWN = "gate_up_proj", "down_proj"


def spec_from_config(config: Any) -> ModelSpec:
    spec = llama.spec_from_config(config)
    experts, top_k = int(config.num_local_experts), int(config.num_experts_per_tok)
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(
            f"num_experts_per_tok {top_k} must be in [1, num_local_experts={experts}]"
        )
    window = getattr(config, "sliding_window", None)
    windows = (int(window),) * spec.num_blocks if window is not None else ()
    return dataclasses.replace(
        spec, family="mixtral", num_experts=experts, num_experts_per_tok=top_k, sliding_windows=windows
    )


class SparseMoE(nn.Module):
    """Router + stacked SwiGLU experts; ``x [B, T, H]`` -> ``[B, T, H]``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        hidden, inter, experts = spec.hidden_size, spec.intermediate_size, spec.num_experts
        self.top_k, self.inter = spec.num_experts_per_tok, inter
        self.gate = nn.Linear(hidden, experts, bias=False)  # the router
        self.experts = _Experts(experts, hidden, inter)
        self.act = llama._ACTIVATIONS[spec.hidden_act]

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert weights ``[N, k]`` (fp32, summing to 1) and indices ``[N, k]`` of tokens ``flat [N, H]``."""
        probs = torch.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        return weights / weights.sum(dim=-1, keepdim=True), index

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [N, H]
        weights, index = self.route(flat)  # [N, k], [N, k]
        adapters = _expert_adapters(lora)
        if index.numel() <= GATHER_MAX_PAIRS:
            out = self._gathered(flat, weights, index, adapters)
        else:
            out = self._grouped(flat, weights, index, adapters)
        return out.reshape(bsz, seq, hidden)  # [B, T, H]

    def _glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.inter, dim=-1)  # [..., I] each
        return self.act(gate) * up  # [..., I]

    def _gathered(
        self, flat: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, adapters: _Adapters
    ) -> torch.Tensor:
        """Each (token, expert) pair gathers its expert's weights; one batched matmul per projection."""
        n, k = index.shape
        pairs = index.reshape(-1)  # [N*k]
        xs = flat.repeat_interleave(k, dim=0)[:, :, None]  # [N*k, H, 1]
        gate_up = torch.bmm(self.experts.gate_up_proj[pairs], xs)[..., 0]  # [N*k, 2I]
        gate_up = gate_up + adapters.delta(GATE_UP, pairs, xs)
        h = self._glu(gate_up)[:, :, None]  # [N*k, I, 1]
        out = torch.bmm(self.experts.down_proj[pairs], h)[..., 0]  # [N*k, H]
        out = out + adapters.delta(DOWN, pairs, h)
        out = (out * weights.reshape(-1, 1)).to(flat.dtype)  # [N*k, H]
        return out.reshape(n, k, -1).sum(dim=1)  # [N, H]

    def _grouped(
        self, flat: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, adapters: _Adapters
    ) -> torch.Tensor:
        """Tokens sorted by expert; each expert runs one matmul over its group (transformers' order of sums)."""
        n, k = index.shape
        order = index.reshape(-1).argsort(stable=True)  # [N*k], pair ids grouped by expert
        counts = torch.bincount(index.reshape(-1), minlength=self.experts.num_experts).tolist()
        out = torch.zeros_like(flat)  # [N, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pair = order[start : start + count]  # [n_e]
            start += count
            token = pair // k  # [n_e]
            xe = flat[token]  # [n_e, H]
            gate_up = F.linear(xe, self.experts.gate_up_proj[expert])  # [n_e, 2I]
            gate_up = gate_up + adapters.expert_delta(GATE_UP, expert, xe)
            h = self._glu(gate_up)  # [n_e, I]
            ye = F.linear(h, self.experts.down_proj[expert]) + adapters.expert_delta(
                DOWN, expert, h
            )  # [n_e, H]
            ye = ye * weights.reshape(-1)[pair, None]  # [n_e, H] (fp32 weights, like transformers)
            out = out.index_add(0, token, ye.to(out.dtype))  # out-of-place: autograd reaches xe
        return out


class _Experts(nn.Module):
    """Stacked expert weights (a module of its own so the names match transformers' ``mlp.experts.*``)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))  # [E, H, I]


class _Adapters:
    """Per-expert LoRA adapters of one block (``A [E, r, in]``, ``B [E, out, r]``), or none."""

    def __init__(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        self.pairs, self.scaling = pairs, scaling

    def delta(self, target: str, experts: torch.Tensor, xs: torch.Tensor) -> torch.Tensor | float:
        """LoRA update for inputs ``xs [P, in, 1]`` of pairs routed to ``experts [P]``: ``[P, out]``."""
        pair = self.pairs.get(target)
        if pair is None:
            return 0.0
        a, b = pair
        low = torch.bmm(a[experts], xs.to(a.dtype))  # [P, r, 1]
        return (torch.bmm(b[experts], low)[..., 0] * self.scaling).to(xs.dtype)  # [P, out]

    def expert_delta(self, target: str, expert: int, x: torch.Tensor) -> torch.Tensor | float:
        """LoRA update of ``expert`` for its tokens ``x [n, in]``: ``[n, out]``."""
        pair = self.pairs.get(target)
        if pair is None:
            return 0.0
        a, b = pair
        return (F.linear(F.linear(x.to(a.dtype), a[expert]), b[expert]) * self.scaling).to(x.dtype)


def _expert_adapters(lora: BlockLora | None) -> _Adapters:
    if lora is None:
        return _Adapters({}, 1.0)
    return _Adapters({t: lora.adapters[t] for t in (GATE_UP, DOWN) if t in lora.adapters}, lora.scaling)


class MixtralBlock(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.self_attn = llama.LlamaAttention(spec, spec.sliding_window(index))
        self.mlp = SparseMoE(spec)
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


def block_tensor_sources(spec: ModelSpec, key: str) -> str | TensorSources | None:
    """Where hub-format checkpoints keep the router and the per-expert w1 (gate), w3 (up) and w2 (down)."""
    moe = "block_sparse_moe."
    if key == "mlp.gate.weight":
        return moe + "gate.weight"
    if key == "mlp.experts.gate_up_proj":
        return [
            [f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"] for e in range(spec.num_experts)
        ]
    if key == "mlp.experts.down_proj":
        return [[f"{moe}experts.{e}.w2.weight"] for e in range(spec.num_experts)]
    return None


FAMILY = ModelFamily(
    name="mixtral",
    model_types=("mixtral",),
    base_prefix="model.",
    block_prefix_template="model.layers.{i}.",
    client_tensor_names=llama.LLAMA_CLIENT_TENSORS,
    spec_from_config=spec_from_config,
    make_block=MixtralBlock,
    make_attn_inputs=llama.make_attn_inputs,
    make_final_norm=llama.make_final_norm,
    lora_targets={
        **llama.attention_lora_targets(),
        GATE_UP: LoraTarget(
            "mlp.experts.gate_up_proj",
            lambda s: (s.hidden_size, 2 * s.intermediate_size),
            experts=lambda s: s.num_experts,
        ),
        DOWN: LoraTarget(
            "mlp.experts.down_proj",
            lambda s: (s.intermediate_size, s.hidden_size),
            experts=lambda s: s.num_experts,
        ),
    },
    default_lora_targets=("q_proj", "v_proj"),
    block_tensor_sources=block_tensor_sources,
)
