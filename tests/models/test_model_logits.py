"""Logits, loss and input gradients of ClientParts + BlockSpan vs transformers on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from tiny_models import KINDS as ALL_KINDS
from tiny_models import MAIN_KINDS

SEQ = 24  # longer than the mistral window (16) and the dynamic-rope trained length (16)


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_logits_match_transformers(kind, hf_model, local_model):
    hf, ours = hf_model(kind), local_model(kind)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits  # [B, T, V]
        # assemble from the parts the way the swarm client does
        parts = ours.client
        got = parts.head(ours.span(parts.pre_blocks(parts.embed(ids))))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_loss_and_input_gradient_match_transformers(kind, hf_model, local_model):
    hf, ours = hf_model(kind), local_model(kind)
    ids = _ids(seed=1)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions must be skipped exactly like HF

    hf_embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    hf_loss = hf(inputs_embeds=hf_embeds, labels=labels).loss
    hf_loss.backward()

    our_embeds = ours.client.embed(ids).detach().requires_grad_(True)
    torch.testing.assert_close(our_embeds, hf_embeds.detach(), rtol=0, atol=0)
    out = ours(inputs_embeds=our_embeds, labels=labels)
    out.loss.backward()

    torch.testing.assert_close(out.loss, hf_loss, rtol=0, atol=1e-5)
    assert hf_embeds.grad is not None and our_embeds.grad is not None
    scale = hf_embeds.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(our_embeds.grad, hf_embeds.grad, rtol=0, atol=1e-4)
    # gradients are small; also check them relative to their magnitude
    assert (our_embeds.grad - hf_embeds.grad).abs().max().item() <= 1e-4 * scale


def test_forward_with_input_ids_and_labels(local_model):
    ours = local_model("llama-tied")
    ids = _ids(batch=1, seq=8)
    out = ours(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 8, 256)
    assert out.loss is not None and out.loss.ndim == 0
    with pytest.raises(ValueError):
        ours(input_ids=ids, inputs_embeds=ours.client.embed(ids))


def test_tied_embeddings_share_weight(local_model):
    parts = local_model("llama-tied").client
    assert parts.lm_head is None
    untied = local_model("llama-gqa-llama3rope").client
    assert untied.lm_head is not None
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
