"""Incremental decoding through KVCache vs one full forward; rollback, reorder, limits, deep prompts."""

from __future__ import annotations

import pytest
import torch

from potluck.models import KVCache, KVCacheOverflowError
from tiny_models import KINDS as ALL_KINDS

SEQ = 24


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _chunks(ids: torch.Tensor) -> list[torch.Tensor]:
    # a chunked prefill (two chunks) and then token by token, as a server sees it
    return [ids[:, :5], ids[:, 5:9]] + [ids[:, t : t + 1] for t in range(9, ids.shape[1])]


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "llama-dynamic-rope"])
@torch.no_grad()
def test_incremental_decoding_matches_full_forward(kind, local_model):
    model = local_model(kind)
    ids = _ids()
    full = model(ids).logits  # [B, T, V]
    cache = model.new_cache(batch_size=2, max_length=SEQ)
    chunks = _chunks(ids)
    pieces = []
    for chunk in chunks:
        before = cache.length
        pieces.append(model.step(chunk, cache))
        assert cache.length == before + chunk.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@torch.no_grad()
def test_dynamic_rope_incremental_decoding_matches_transformers_cached_decoding(hf_model, local_model):
    # Dynamic NTK changes the frequencies with the current length, so cached decoding legitimately differs from a
    # full forward (keys keep the rotation they were written with). The oracle is transformers' own cached decoding.
    from transformers import DynamicCache

    hf, model = hf_model("llama-dynamic-rope"), local_model("llama-dynamic-rope")
    ids = _ids()
    hf_cache = DynamicCache(config=hf.config)
    cache = model.new_cache(batch_size=2, max_length=SEQ)
    for chunk in _chunks(ids):
        expected = hf(chunk, cache=hf_cache, use_cache=True).logits
        torch.testing.assert_close(model.step(chunk, cache), expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_rollback_recomputes_same_logits(local_model):
    model = local_model("llama-gqa-llama3rope")
    ids = _ids()
    alt = _ids(seed=7)[:, :6]
    full = model(ids).logits
    cache = model.new_cache(2, 32)
    model.step(ids[:, :10], cache)
    model.step(alt, cache)  # a speculative branch that gets rejected
    assert cache.length == 16
    cache.rollback(10)
    assert cache.length == 10
    got = model.step(ids[:, 10:], cache)
    torch.testing.assert_close(got, full[:, 10:], rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        cache.rollback(cache.length + 1)
    with pytest.raises(ValueError):
        cache.rollback(-1)


@pytest.mark.parametrize("kind", ["llama-gqa-llama3rope", "bloom"])
@torch.no_grad()
def test_reorder_matches_reordered_batch_from_scratch(kind, local_model):
    model = local_model(kind)
    ids = _ids(batch=3, seq=12, seed=3)
    order = torch.tensor([2, 0, 0])  # beam search may duplicate and drop rows
    cache = model.new_cache(3, 16)
    model.step(ids[:, :10], cache)
    cache.reorder(order)
    got = model.step(ids[order, 10:], cache)
    expected = model(ids[order]).logits[:, 10:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        cache.reorder(torch.tensor([0, 1]))


@torch.no_grad()
def test_cache_layout_limits_and_nbytes(local_model):
    model = local_model("llama-gqa-llama3rope")
    spec = model.spec
    cache = model.new_cache(batch_size=2, max_length=8)
    assert isinstance(cache, KVCache)
    assert cache.num_blocks == spec.num_blocks == len(cache.keys) == len(cache.values)
    assert cache.keys[0].shape == (2, spec.num_kv_heads, 8, spec.head_dim)
    assert cache.batch_size == 2 and cache.max_length == 8 and cache.length == 0
    assert cache.nbytes == 2 * spec.num_blocks * 2 * spec.num_kv_heads * 8 * spec.head_dim * 4
    model.step(_ids(seq=6), cache)
    with pytest.raises(KVCacheOverflowError, match="max_length"):
        model.step(_ids(seq=3), cache)
    assert cache.length == 6  # a refused write leaves the cache untouched
    with pytest.raises(ValueError, match="batch size"):
        model.step(_ids(batch=1, seq=1), cache)
    other = KVCache.allocate(spec, 3, 1, 4, torch.bfloat16, "cpu")
    assert other.num_blocks == 3 and other.dtype == torch.bfloat16


@torch.no_grad()
def test_span_slice_with_cache_matches_parent(local_model):
    model = local_model("qwen2")
    span = model.span
    sub = span.slice(2, 5)
    assert (sub.start, sub.end, len(sub.blocks)) == (2, 5, 3)
    assert sub.blocks[0] is span.blocks[2]  # shares parameters
    hidden = torch.randn(2, 10, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = span.slice(5, 8)(sub(span.slice(0, 2)(hidden)))
    torch.testing.assert_close(expected, span(hidden), rtol=0, atol=1e-5)
    cache = sub.new_cache(2, 10)
    assert cache.num_blocks == 3
    out = torch.cat([sub(hidden[:, :6], cache=cache), sub(hidden[:, 6:], cache=cache)], dim=1)
    torch.testing.assert_close(out, sub(hidden), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        span.slice(5, 9)
    with pytest.raises(ValueError):
        sub.slice(1, 3)


def test_deep_prompts_are_added_before_each_block(local_model):
    model = local_model("llama-tied")
    span = model.span.slice(0, 3)
    hidden = torch.randn(2, 7, model.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    prompts = torch.zeros(3, 1, 4, model.spec.hidden_size, requires_grad=True)
    # zero prompts change nothing
    torch.testing.assert_close(span(hidden, prompts=prompts), span(hidden), rtol=0, atol=0)
    # a prompt on block 1 equals adding it by hand between blocks 0 and 1
    delta = torch.randn(1, 4, model.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        prompts[1] = delta
    h = span.blocks[0](hidden, model.family.make_attn_inputs(model.spec, 0, 7, hidden.device, hidden.dtype))
    expected = span.slice(1, 3)(torch.cat([h[:, :4] + delta, h[:, 4:]], dim=1))
    out = span(hidden, prompts=prompts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    out.sum().backward()  # prompts are trainable
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # with a cache, only positions inside the prefix get the prompt
    with torch.no_grad():
        cache = span.new_cache(2, 7)
        chunked = torch.cat(
            [
                span(hidden[:, :3], cache=cache, prompts=prompts),
                span(hidden[:, 3:], cache=cache, prompts=prompts),
            ],
            dim=1,
        )
    torch.testing.assert_close(chunked, out.detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        span(hidden, prompts=prompts[:2])
