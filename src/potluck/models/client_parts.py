"""The parts of a model the client keeps: word embeddings, (BLOOM) embedding norm, final norm and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models.family import ModelFamily
from potluck.models.layers import softcap
from potluck.models.row_batching import RowBatcher
from potluck.models.spec import ModelSpec

HEAD_BATCH_ROWS = 64  # at most this many rows of concurrent callers share one LM-head call (see head())


class ClientParts(nn.Module):
    """Embeddings in, logits out; the blocks in between run elsewhere.

    Parameter names are family-independent (``embed_tokens``, ``embed_norm``, ``norm``, ``lm_head``); the
    family's ``client_tensor_names`` maps them to checkpoint names. With tied embeddings there is no ``lm_head``
    module and :meth:`head` multiplies by the embedding matrix. What differs between families comes from the spec
    (padding row, embedding scale, logit soft-capping) and the family (norm modules).
    """

    def __init__(self, spec: ModelSpec, family: ModelFamily) -> None:
        super().__init__()
        self.spec = spec
        self.family = family
        # Built on the meta device, then given the checkpoint's tensors (loading.py): an empty weight skips
        # nn.Embedding's normal_ init, which on meta tensors imports torch._dynamo (~1.5 s of a server's start).
        weight = torch.empty(spec.vocab_size, spec.hidden_size)  # [V, H]
        self.embed_tokens = nn.Embedding(
            spec.vocab_size, spec.hidden_size, padding_idx=_padding_idx(spec), _weight=weight
        )
        self.embed_norm: nn.Module | None = family.make_embed_norm(spec) if family.make_embed_norm else None
        self.norm = family.make_final_norm(spec)
        # an nn.Linear, or potluck.models.cpu_linear.PackedLinear on CPU (see prepack_head)
        self.lm_head: nn.Module | None = (
            None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        )
        self.shared_head = RowBatcher(self._head_rows, max_rows=HEAD_BATCH_ROWS)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings ``[B, T, hidden]`` as HF's ``get_input_embeddings()`` returns them (``inputs_embeds``).

        Gemma's embedding module multiplies by ``sqrt(hidden)`` rounded to the weights' dtype, so we do it here too.
        """
        embeds = self.embed_tokens(input_ids)  # [B, T, hidden]
        if self.spec.embed_scale is not None:
            embeds = embeds * torch.tensor(self.spec.embed_scale, dtype=embeds.dtype, device=embeds.device)
        return embeds

    def pre_blocks(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0: BLOOM normalises the embeddings, Llama-style models do nothing."""
        if self.embed_norm is None:
            return inputs_embeds
        return self.embed_norm(inputs_embeds)  # [B, T, hidden]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-capping): ``[B, T, hidden]`` -> logits ``[B, T, vocab]``.

        Without autograd, small calls made at the same time by several threads (one per session in a serving
        process) run as one matmul over all their rows (:mod:`potluck.models.row_batching`): the head streams
        the whole vocabulary matrix per call, so 8 sessions' decode steps cost about 2 rows' worth, not 8.
        """
        bsz, seq, width = hidden.shape
        if torch.is_grad_enabled() or bsz * seq > HEAD_BATCH_ROWS:
            return self._head_rows(hidden)
        return self.shared_head(hidden.reshape(bsz * seq, width)).view(bsz, seq, -1)  # [B, T, V]

    def _head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., vocab]``; row-wise, so rows of different callers may share a call."""
        hidden = self.norm(hidden)  # [..., hidden]
        if self.lm_head is None:
            logits = F.linear(hidden, self.embed_tokens.weight)  # [..., V]
        else:
            logits = self.lm_head(hidden)  # [..., V]
        if self.spec.final_logit_softcap is not None:
            logits = softcap(logits, self.spec.final_logit_softcap)
        return logits

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight ``[V, hidden]`` as a dense tensor (the embedding matrix when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.weight
        weight = self.lm_head.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def prepack_head(self) -> bool:
        """Prepack an untied fp32 CPU LM head for oneDNN (:mod:`potluck.models.cpu_linear`); True if done.

        Only for a frozen head (a serving client's); a tied head shares the embedding matrix and stays as is.
        """
        from potluck.models.cpu_linear import prepack_linears

        return self.lm_head is not None and prepack_linears(self) > 0


def _padding_idx(spec: ModelSpec) -> int | None:
    # HF embeddings get config.pad_token_id as padding_idx (its row gets no gradient) where the family's spec keeps it.
    if spec.pad_token_id is None or not 0 <= spec.pad_token_id < spec.vocab_size:
        return None
    return spec.pad_token_id
