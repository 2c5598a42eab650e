"""Linear layers with their weights prepacked for oneDNN, for fp32 spans and LM heads on CPU.

Why: PyTorch's CPU build calls MKL for ``F.linear``, and on non-Intel x86 CPUs MKL's sgemm runs a few rows at
about gemv speed per row, so a batch of 8 decode rows costs ~4x one row instead of ~1x (measured on a 2-core AMD
EPYC, 1024x2816 weight: 0.33 / 1.37 ms for 1 / 8 rows). A decode step is memory-bound: what batching across
sessions should save is the weight streaming. oneDNN's kernels on a weight reordered once into their blocked
layout keep 8 rows at ~2x one row (0.33 / 0.76 ms), and a 32000-row LM head at 13.7 ms for 8 rows instead of 27.5.
For long prefills (hundreds of rows) they are ~10% slower than MKL; decode dominates serving, so one layout is
kept (the dense weight is not, which would double the memory).

Results agree with ``F.linear`` to float32 rounding (a different summation order), like any other kernel choice.
Autograd reaches the inputs (and the bias) through :class:`_PackedLinearFunction`; the weight is frozen, as every
weight a server or a client's head holds is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_MKLDNN = torch.ops.mkldnn


def prepack_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether this torch build can prepack ``dtype`` weights on ``device`` (fp32 on CPU with oneDNN)."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(_MKLDNN, "_reorder_linear_weight")
        and hasattr(_MKLDNN, "_linear_pointwise")
    )


class _PackedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` on a packed ``W``; backward gives the input's (and bias') gradient, never the weight's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        return _MKLDNN._linear_pointwise(x, packed, bias, "none", [], "")  # [..., out]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        (packed,) = ctx.saved_tensors
        grad_x = grad @ packed.to_dense() if ctx.needs_input_grad[0] else None  # [..., out] @ [out, in]
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight lives in oneDNN's blocked layout (see the module docstring).

    The packed weight is a non-persistent buffer (it counts in :func:`potluck.models.quant.module_bytes`); the
    bias stays an ordinary parameter. ``weight`` returns a dense copy for the rare reader.
    """

    packed_weight: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not prepack_supported(linear.weight.dtype, linear.weight.device):
            raise ValueError(
                f"cannot prepack a {linear.weight.dtype} weight on {linear.weight.device} (fp32 on CPU with oneDNN)"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = _MKLDNN._reorder_linear_weight(linear.weight.detach(), None)  # [out, in], blocked layout
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed_weight.to_dense()  # [out, in]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"a prepacked linear takes float32 CPU inputs, got {x.dtype} on {x.device}")
        x = x.contiguous()  # [..., in]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if needs_grad:
            return _PackedLinearFunction.apply(x, self.packed_weight, self.bias)  # type: ignore[no-any-return]
        return _MKLDNN._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")  # [..., out]


def prepack_linears(module: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` inside ``module`` by a :class:`PackedLinear`; returns how many.

    Does nothing where :func:`prepack_supported` says no (other dtypes, GPUs, quantized layers, which are not
    ``nn.Linear``). The weights must be frozen: a packed weight gets no gradient.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and prepack_supported(child.weight.dtype, child.weight.device):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
