"""Math shared by the model families: norms, rotary embeddings, masks and the attention call."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models.kv_cache import KVCache
from potluck.models.spec import RopeSpec

# ``enable_gqa`` (torch >= 2.5) lets SDPA broadcast KV heads without materialising repeated keys, which matters
# for long caches; older torch gets an explicit repeat.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Llama RMSNorm; normalises in fp32 and casts back before the weight, exactly like transformers."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()  # [B, T, H]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [B, T, H]
        return self.weight * x32.to(input_dtype)  # [B, T, H]


class UnitOffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by ``1 + weight`` (weights stored centred on 0), all in fp32, cast back at the end."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # [..., H]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., H]
        return (x32 * (1.0 + self.weight.float())).type_as(x)  # [..., H]


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: bounds logits smoothly to (-cap, cap) (Gemma 2 attention scores and LM logits)."""
    return torch.tanh(x / cap) * cap


@dataclass
class AttnInputs:
    """Per-forward data shared by all blocks of a span: positions, rotary tables, masks.

    Built once per span forward so that every block reuses the same tensors.
    """

    offset: int  # absolute position of the first new token
    q_len: int  # number of new tokens T
    cos: torch.Tensor | None = None  # [T, D] rotary cos (RoPE models)
    sin: torch.Tensor | None = None  # [T, D]
    bias: torch.Tensor | None = None  # [1 or B, H, T, S] additive bias incl. -inf masking (ALiBi models)
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)
    device: torch.device | None = None
    # [B] left padding per row: row b's keys at positions < pads[b] are padding and masked (None: no padding)
    pads: torch.Tensor | None = None
    # a packed batch of sessions (see BlockSpan.forward_packed): hidden states are [1, N, hidden] with each
    # member's rows laid out token-major in its own range; attention runs per member on its own cache
    members: list[PackedMember] | None = None

    @property
    def kv_len(self) -> int:
        return self.offset + self.q_len

    def mask(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """Boolean attention mask ``[T, S]`` (True = attend) for a block with sliding ``window``, or ``is_causal``.

        Returns ``(None, True)`` where SDPA's built-in causal mask is exact (no cache offset, no effective window)
        and ``(None, False)`` where nothing needs masking (one query that may see every key).
        """
        o, t, s = self.offset, self.q_len, self.kv_len
        window_active = window is not None and window < s
        if self.pads is not None:
            if window not in self._masks:
                self._masks[window] = self._padded_mask(window)
            return self._masks[window], False
        if not window_active:
            if t == 1:
                return None, False
            if o == 0:
                return None, True
        if window not in self._masks:
            q_pos = torch.arange(o, s, device=self.device)[:, None]  # [T, 1]
            k_pos = torch.arange(s, device=self.device)[None, :]  # [1, S]
            allowed = k_pos <= q_pos  # [T, S]
            if window is not None:
                # same convention as transformers' sliding_window_overlay: kv_idx > q_idx - window
                allowed = allowed & (k_pos > q_pos - window)
            self._masks[window] = allowed
        return self._masks[window], False

    def _padded_mask(self, window: int | None) -> torch.Tensor:
        """``[B, 1, T, S]`` causal mask that also hides each row's left padding.

        A padding query keeps its own position visible, so no row of the mask is empty (SDPA would return NaN,
        which the next block would then read as a key); padding outputs never reach real tokens.
        """
        assert self.pads is not None
        o, s = self.offset, self.kv_len
        q_pos = torch.arange(o, s, device=self.device)[:, None]  # [T, 1]
        k_pos = torch.arange(s, device=self.device)[None, :]  # [1, S]
        allowed = k_pos <= q_pos  # [T, S]
        if window is not None:
            # positions count real tokens only, but the window is a difference of positions, so it is the same
            allowed = allowed & (k_pos > q_pos - window)
        pads = self.pads.to(self.device)[:, None, None]  # [B, 1, 1]
        allowed = allowed[None] & ((k_pos[None] >= pads) | (k_pos == q_pos)[None])  # [B, T, S]
        return allowed[:, None]  # [B, 1, T, S]


@dataclass
class PackedMember:
    """One session inside a packed forward: tokens ``lo..hi-1`` of the packed sequence are its ``[B, T]`` rows."""

    cache: KVCache
    lo: int
    hi: int
    batch: int
    q_len: int
    inputs: AttnInputs  # this member's own positions, masks / ALiBi bias


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: AttnInputs,
    cache: KVCache | None,
    cache_index: int,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write ``k, v [B, KVH, T, D]`` to the cache (if any) and attend with ``q [B, H, T, D]``; returns ``[B, H, T, D]``.

    Every model family calls this, so per-row padding and packed batches of sessions work for all of them.
    ``q`` and ``k`` carry their rotary embedding already (RoPE models).
    """
    if inputs.members is not None:
        return _packed_attention(q, k, v, inputs.members, cache_index, window, scale, softcap)
    if cache is not None:
        k, v = cache.write(cache_index, k, v)  # [B, KVH, L+T, D]
    if inputs.bias is not None:
        return attention(q, k, v, inputs.bias, False, scale, softcap)
    mask, is_causal = inputs.mask(window)
    return attention(q, k, v, mask, is_causal, scale, softcap)


def _packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    members: list[PackedMember],
    cache_index: int,
    window: int | None,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of a packed batch ``[1, H, N, D]``: each member attends over its own cache."""
    outs = []
    for m in members:

        def rows(x: torch.Tensor, m: PackedMember = m) -> torch.Tensor:
            # [1, h, n, D] token range -> [B, h, T, D] rows (tokens are laid out row-major per member)
            part = x[0, :, m.lo : m.hi]  # [h, B*T, D]
            return part.reshape(part.shape[0], m.batch, m.q_len, part.shape[-1]).transpose(0, 1)

        out = cached_attention(
            rows(q), rows(k), rows(v), m.inputs, m.cache, cache_index, window, scale, softcap
        )
        outs.append(
            out.transpose(0, 1).reshape(out.shape[1], m.batch * m.q_len, out.shape[-1])
        )  # [H, B*T, D]
    return torch.cat(outs, dim=1)[None]  # [1, H, N, D]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """SDPA over ``q [B, H, T, D]`` and ``k, v [B, KVH, S, D]``; returns ``[B, H, T, D]``.

    ``mask`` is boolean (True = attend) or additive. With ``logit_softcap`` the scores are soft-capped before
    masking, which SDPA cannot do, so that case runs the explicit (eager) computation.
    """
    if logit_softcap is not None:
        return _softcapped_attention(q, k, v, mask, is_causal, scale, logit_softcap)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads != num_kv_heads:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, S, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, S, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    cap: float,
) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads != num_kv_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, S, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [B, H, S, D]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = softcap(torch.matmul(q, k.transpose(2, 3)) * scale, cap)  # [B, H, T, S]
    t, s = q.shape[2], k.shape[2]
    if is_causal:  # SDPA's convention: top-left aligned (only used without a cache offset)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()  # [T, S]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # [B, H, T, S]
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [B, H, T, S]
    return torch.matmul(probs, v)  # [B, H, T, D]


def rope_inv_freq(rope: RopeSpec, head_dim: int, seq_len: int, device: torch.device | None) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` in fp32, matching transformers' ROPE_INIT_FUNCTIONS for our rope types.

    ``seq_len`` is the total length the current forward covers (cache + new tokens); only dynamic NTK uses it.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim  # [D/2]
    base = rope.theta
    if rope.rope_type == "dynamic" and seq_len > rope.max_position_embeddings:
        # Dynamic NTK: grow the base once the sequence exceeds the trained length. transformers recomputes this
        # statefully (a cache of the longest length seen); computing it from the current length gives the same
        # frequencies as long as a sequence only grows, which is the case within one generation.
        scale = (rope.factor * seq_len / rope.max_position_embeddings) - (rope.factor - 1)
        base = base * scale ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base**exponents)  # [D/2]
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq  # [D/2]
        # long wavelengths are interpolated (divided by factor), short ones kept, the middle band blended
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)  # [D/2]
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )  # [D/2]
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled  # [D/2]
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)  # [D/2]
        inv_freq = torch.where(is_medium, smoothed, scaled)  # [D/2]
    return inv_freq


def rope_cos_sin(
    rope: RopeSpec,
    head_dim: int,
    offset: int,
    q_len: int,
    device: torch.device,
    dtype: torch.dtype,
    pads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, D]`` for positions ``offset..offset+T-1`` (fp32 math, cast like transformers).

    With left padding ``pads [B]`` row b's tokens sit at positions ``offset - pads[b] ...`` (transformers'
    ``cumsum(attention_mask) - 1``; padding itself at 0) and the tables are per row, ``[B, 1, T, D]``.
    """
    positions = torch.arange(offset, offset + q_len, device=device).float()  # [T]
    seq_len = offset + q_len
    if pads is not None:
        positions = (positions[None, :] - pads.to(device)[:, None].float()).clamp_min(0)  # [B, T]
        seq_len = int(positions.max().item()) + 1
    inv_freq = rope_inv_freq(rope, head_dim, seq_len, device)  # [D/2]
    freqs = positions[..., None] * inv_freq  # [(B,) T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [(B,) T, D]
    if pads is not None:
        emb = emb[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by tables ``[T, D]`` or per-row ``[B, 1, T, D]`` (HF's half-split layout)."""
    return x * cos + rotate_half(x) * sin  # [B, H, T, D]
