"""Prepacked oneDNN linear layers (models/cpu_linear.py): same results as F.linear, gradients to the inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from potluck.models import LocalCausalLM
from potluck.models.cpu_linear import (
    DENSE_AFTER,
    PACK_AFTER,
    PACKED_MAX_ROWS,
    PackedLinear,
    next_layout,
    prepack_linears,
    prepack_supported,
)
from potluck.models.quant import module_bytes

pytestmark = pytest.mark.skipif(
    not prepack_supported(torch.float32, "cpu"), reason="this torch build has no oneDNN linear prepacking"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (8, 1, 64)])
def test_packed_linear_matches_f_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        xt = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)  # non-contiguous input
        torch.testing.assert_close(packed(xt), F.linear(xt, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, linear.weight)
    assert module_bytes(packed) == module_bytes(linear)


def test_packed_linear_gradients_reach_input_and_bias() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(32, 48)
    linear.weight.requires_grad_(False)
    packed = PackedLinear(linear)  # shares the bias parameter
    x = torch.randn(2, 3, 32, requires_grad=True)
    upstream = torch.randn(2, 3, 48)
    (packed(x) * upstream).sum().backward()
    got_x, got_b = x.grad.clone(), linear.bias.grad.clone()  # type: ignore[union-attr]
    x.grad, linear.bias.grad = None, None
    (linear(x) * upstream).sum().backward()
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_b, linear.bias.grad, rtol=1e-5, atol=1e-5)


def test_packed_linear_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="cannot prepack"):
        PackedLinear(nn.Linear(8, 8).to(torch.bfloat16))
    packed = PackedLinear(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="float32 CPU inputs"):
        packed(torch.randn(1, 8, dtype=torch.bfloat16))


def test_prepacked_span_computes_what_the_plain_span_does(tiny_model_dir: Any) -> None:
    model = LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))
    plain = LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))
    bf16 = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16))
    assert prepack_linears(bf16) == 0  # only fp32 on CPU
    blocks = len(model.span.blocks)
    assert prepack_linears(model.span) == 7 * blocks  # q, k, v, o, gate, up, down in every block
    assert not any(type(m) is nn.Linear for m in model.span.modules())
    assert module_bytes(model.span) == module_bytes(plain.span)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache_a, cache_b = model.new_cache(2, 16), plain.new_cache(2, 16)
        torch.testing.assert_close(model.step(ids, cache_a), plain.step(ids, cache_b), rtol=1e-4, atol=1e-4)
        nxt = ids[:, -1:]
        torch.testing.assert_close(model.step(nxt, cache_a), plain.step(nxt, cache_b), rtol=1e-4, atol=1e-4)


def test_prepacked_head_keeps_logits_and_dense_weight(tiny_model_dir: Any) -> None:
    model = LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))
    hidden = torch.randn(3, 2, model.client.spec.hidden_size)
    with torch.no_grad():
        before, weight = model.client.head(hidden), model.client.head_weight().clone()
        assert model.client.prepack_head()
        assert isinstance(model.client.lm_head, PackedLinear)
        torch.testing.assert_close(model.client.head(hidden), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.client.head_weight(), weight)


def test_layout_follows_the_rows_with_hysteresis() -> None:
    """Batched calls pack only PACK_AFTER in a row (a short prompt's one prefill call does not); one row goes
    dense only after DENSE_AFTER one-row calls in a row; long prefills leave the layout alone."""
    packed, streak = False, 0
    for _ in range(3 * DENSE_AFTER):  # a lone session decoding: stays dense
        packed, streak = next_layout(packed, streak, 1)
        assert not packed
    for _ in range(5):  # each generation of a lone session: a short prompt's prefill, then its decode steps
        packed, streak = next_layout(packed, streak, 30)
        assert not packed and streak == -1
        for _ in range(4):
            packed, streak = next_layout(packed, streak, 1)
            assert not packed
    for i in range(PACK_AFTER):  # batches of 8 sessions' steps, step after step
        packed, streak = next_layout(packed, streak, 8)
        assert packed == (i == PACK_AFTER - 1) and streak == (0 if packed else -(i + 1))
    for i in range(DENSE_AFTER - 1):  # steps that batch only some of the time do not flip the layout
        packed, streak = next_layout(packed, streak, 1)
        assert packed and streak == i + 1
    packed, streak = next_layout(packed, streak, PACKED_MAX_ROWS + 1)  # a long prefill: no vote
    assert packed and streak == DENSE_AFTER - 1
    packed, streak = next_layout(packed, streak, 1)
    assert not packed and streak == 0
    assert next_layout(False, 5, PACKED_MAX_ROWS + 1) == (False, 5)
    assert next_layout(False, -1, PACKED_MAX_ROWS + 1) == (False, -1)


def test_adaptive_linear_switches_layout_and_stays_exact() -> None:
    """The weight moves between layouts as the calls' rows change; results match F.linear in both, gradients
    still reach the input after a switch made inside inference_mode, and a fixed layer never switches."""
    torch.manual_seed(2)
    linear = nn.Linear(64, 96)
    linear.requires_grad_(False)
    layer = PackedLinear(linear)
    assert not layer.packed and layer.weight.layout == torch.strided  # no load yet: dense
    one, few = torch.randn(1, 1, 64), torch.randn(4, 1, 64)
    with torch.inference_mode():
        for _ in range(PACK_AFTER):  # exact in the dense layout, then in the packed one
            assert not layer.packed
            torch.testing.assert_close(
                layer(few), F.linear(few, linear.weight, linear.bias), rtol=1e-5, atol=1e-5
            )
        assert layer.packed and layer.switches == 1
        torch.testing.assert_close(
            layer(few), F.linear(few, linear.weight, linear.bias), rtol=1e-5, atol=1e-5
        )
        for _ in range(DENSE_AFTER):
            torch.testing.assert_close(
                layer(one), F.linear(one, linear.weight, linear.bias), rtol=1e-5, atol=1e-5
            )
        assert not layer.packed and layer.switches == 2
    assert torch.equal(layer.weight, linear.weight)
    x = torch.randn(3, 64, requires_grad=True)
    for _ in range(PACK_AFTER - 1):
        layer(x.detach())
    (layer(x) ** 2).sum().backward()  # packs again, outside inference_mode, with autograd
    expected = torch.autograd.grad((F.linear(x, linear.weight, linear.bias) ** 2).sum(), x)[0]
    assert layer.packed and layer.switches == 3
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    fixed = PackedLinear(linear, adaptive=False)
    with torch.inference_mode():
        for _ in range(DENSE_AFTER + 1):
            fixed(one)
    assert fixed.packed and fixed.switches == 0
