"""Per-row positions: left-padded batches exact vs transformers, packed multi-session forwards exact vs alone."""

from __future__ import annotations

import pytest
import torch

from potluck.client.generation import left_padding
from tiny_models import MAIN_KINDS


def _padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 0, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, 256, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_left_padded_logits_match_transformers(kind, hf_model, local_model):
    hf, model = hf_model(kind), local_model(kind)
    ids, mask = _padded_batch([10, 6, 3])
    expected = hf(ids, attention_mask=mask).logits  # [B, T, V]
    cache = model.new_cache(3, 16)
    cache.set_pads(left_padding(mask))
    got = torch.cat(
        [model.step(ids[:, :4], cache), model.step(ids[:, 4:], cache)], dim=1
    )  # prefill in 2 chunks
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_left_padded_generation_matches_transformers(kind, hf_model, local_model):
    hf, model = hf_model(kind), local_model(kind)
    ids, mask = _padded_batch([9, 4, 6], seed=1)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs), expected)


def test_left_padding_rejects_other_masks():
    assert left_padding(torch.ones(2, 4)) is None
    assert left_padding(torch.tensor([[0, 1, 1], [1, 1, 1]])) == [1, 0]
    with pytest.raises(ValueError, match="left padding"):
        left_padding(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="without any token"):
        left_padding(torch.tensor([[0, 0], [1, 1]]))


@pytest.mark.parametrize("kind", MAIN_KINDS)
@torch.no_grad()
def test_packed_sessions_match_each_session_alone(kind, local_model):
    """Sessions at different lengths, one of them padded, one prefilling a chunk: one forward, same outputs."""
    model = local_model(kind)
    span, parts = model.span, model.client
    gen = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(0, 256, (b, n), generator=gen) for b, n in ((1, 5), (2, 9), (1, 1), (1, 13))]
    news = [torch.randint(0, 256, (b, t), generator=gen) for b, t in ((1, 1), (2, 1), (1, 4), (1, 1))]
    pads = [None, [3, 0], None, None]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return parts.pre_blocks(parts.embed(ids))

    alone, caches = [], []
    for prefix, new, pad in zip(prefixes, news, pads, strict=True):
        ref = span.new_cache(prefix.shape[0], 24)
        ref.set_pads(pad)
        span(embed(prefix), cache=ref)
        alone.append(span(embed(new), cache=ref))
        cache = span.new_cache(prefix.shape[0], 24)
        cache.set_pads(pad)
        span(embed(prefix), cache=cache)
        caches.append(cache)
    packed = span.forward_packed([(embed(new), c) for new, c in zip(news, caches, strict=True)])
    for got, want, cache, prefix, new in zip(packed, alone, caches, prefixes, news, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # packing changes summation order only
        assert cache.length == prefix.shape[1] + new.shape[1]


def test_reorder_moves_padding_with_rows(local_model):
    cache = local_model("llama-tied").new_cache(3, 8)
    cache.set_pads([2, 0, 1])
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.pads is not None and cache.pads.tolist() == [1, 1, 2]
    cache.set_pads([0, 0, 0])
    assert cache.pads is None


@pytest.mark.parametrize("kind", ["llama-gqa-llama3rope", "bloom"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 3, "eos_token_id": None},
        # an eos that random tiny models do emit, so finished hypotheses and length penalties matter
        {"num_beams": 4, "eos_token_id": [5, 17, 99], "length_penalty": 0.5, "repetition_penalty": 1.3},
        {"num_beams": 2, "eos_token_id": 17, "early_stopping": True},
        # tokens the llama model emits early for these prompts: hypotheses finish at different lengths
        {"num_beams": 3, "eos_token_id": [154, 25], "length_penalty": 1.5},
        {"num_beams": 3, "eos_token_id": [154, 25], "early_stopping": True},
    ],
)
@torch.no_grad()
def test_beam_search_matches_transformers(kind, kwargs, hf_model, local_model):
    hf, model = hf_model(kind), local_model(kind)
    ids, mask = _padded_batch([8, 5], seed=4)
    common = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, **kwargs}
    expected = hf.generate(ids, attention_mask=mask, **common)
    assert torch.equal(model.generate(ids, attention_mask=mask, **common), expected)
