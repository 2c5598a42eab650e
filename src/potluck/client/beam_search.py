"""Beam search with transformers' semantics (``GenerationMixin._beam_search``, vectorised form).

Same candidate selection (top ``max(2, 1 + n_eos) * num_beams`` continuations over all beams), same handling of
finished hypotheses with ``length_penalty``, same ``early_stopping`` heuristic, so the returned sequences equal
HF ``generate(num_beams=K)`` for the same logits. The model is ``step(new_ids [B*K, t], hypo_ids)`` returning the
last position's logits: ``hypo_ids [B*K]`` (None on the first call) says which former row each row continues,
so the caller reorders its KV cache (locally, or on the servers through ``InferenceStep.hypo_ids``) first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

BeamStepFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

_NEG = -1.0e9  # transformers' "impossible" score


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor [B, K, ...]`` rows ``indices [B, K']`` along the beam dimension."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


@torch.no_grad()
def beam_search_tokens(
    step: BeamStepFn,
    input_ids: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    processors: Any,
    stopping: Any,
    eos_ids: list[int] | None,
    pad_token_id: int | None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> torch.Tensor:
    """Best beam per batch row: ``[B, T + generated]`` (shorter when every beam finished early)."""
    batch, prompt_len = input_ids.shape
    k = num_beams
    max_length = prompt_len + max_new_tokens
    device = input_ids.device
    keep = max(2, 1 + (len(eos_ids) if eos_ids else 0)) * k
    top_k_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(
        device
    )
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    fill = (pad or eos_ids[0]) if eos_ids is not None else -1  # transformers' fill value, quirks included

    running = torch.full((batch, k, max_length), fill, dtype=torch.long, device=device)  # [B, K, L]
    running[:, :, :prompt_len] = input_ids[:, None]
    sequences = running.clone()  # finished hypotheses
    running_scores = torch.zeros(batch, k, device=device)
    running_scores[:, 1:] = _NEG  # all beams start equal: only the first may expand at the first step
    beam_scores = torch.full((batch, k), _NEG, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_idx = torch.full(
        (batch, k, max(max_length - prompt_len, 1)), -1, dtype=torch.int32, device=device
    )
    beam_indices = running_idx.clone()

    cur = prompt_len
    new_ids = input_ids.repeat_interleave(k, dim=0)  # [B*K, T]
    hypo_ids: torch.Tensor | None = None
    while cur < max_length:
        logits = step(new_ids, hypo_ids)
        if logits.dim() == 3:
            logits = logits[:, -1]
        logits = logits.to(device=device, dtype=torch.float32, copy=True)  # [B*K, V]
        vocab = logits.shape[-1]
        flat_running = running[:, :, :cur].reshape(batch * k, cur)
        log_probs = processors(cast(torch.LongTensor, flat_running), torch.log_softmax(logits, dim=-1))
        log_probs = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)

        topk_scores, topk_indices = torch.topk(log_probs, k=keep)  # [B, keep]
        from_beam = topk_indices // vocab
        topk_idx = _gather(running_idx, from_beam)
        topk_seq = _gather(running, from_beam)
        topk_seq[:, :, cur] = topk_indices % vocab
        topk_idx[:, :, cur - prompt_len] = (from_beam + torch.arange(batch, device=device)[:, None] * k).to(
            torch.int32
        )
        hits = stopping(
            cast(torch.LongTensor, topk_seq[:, :, : cur + 1].reshape(batch * keep, cur + 1)), None
        )
        if cur + 1 >= max_length:  # transformers' MaxLengthCriteria
            hits = torch.ones_like(hits)
        hits = hits.view(batch, keep)

        # the best beams that did not just finish go on
        alive_scores = topk_scores + hits.float() * _NEG
        nxt = torch.topk(alive_scores, k=k)[1]
        running, running_scores, running_idx = (
            _gather(topk_seq, nxt), _gather(alive_scores, nxt), _gather(topk_idx, nxt)
        )  # fmt: skip

        # hypotheses that just finished among the top K join the finished ones if they score better
        just_finished = hits & top_k_mask[None, :]
        done_scores = topk_scores / ((cur + 1 - prompt_len) ** length_penalty)
        done_scores = done_scores + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * _NEG
        done_scores = done_scores + (~improvable).float() * _NEG
        done_scores = done_scores + (~just_finished).float() * _NEG
        merged_scores = torch.cat([beam_scores, done_scores], dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        sequences = _gather(torch.cat([sequences, topk_seq], dim=1), best)
        beam_scores = _gather(merged_scores, best)
        beam_indices = _gather(torch.cat([beam_indices, topk_idx], dim=1), best)
        finished = _gather(torch.cat([finished, just_finished], dim=1), best)

        hypo_ids = running_idx[..., cur - prompt_len].reshape(-1).to(torch.long)  # [B*K]
        cur += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur - prompt_len
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_done = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], torch.tensor(_NEG))
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        open_beam = not (bool(finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        new_ids = running[:, :, cur - 1].reshape(batch * k, 1)  # [B*K, 1]

    generated = int((beam_indices[:, 0] + 1).bool().sum(dim=1).max())
    return sequences[:, 0, : prompt_len + generated]
