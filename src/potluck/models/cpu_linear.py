"""Linear layers with their weights prepacked for oneDNN, for fp32 spans and LM heads on CPU.

Why: PyTorch's CPU build calls MKL for ``F.linear``, and on non-Intel x86 CPUs MKL's sgemm runs a few rows at
about gemv speed per row, so a batch of 8 decode rows costs ~4x one row instead of ~1x (measured on a 2-core AMD
EPYC, 1024x2816 weight: 0.33 / 1.37 ms for 1 / 8 rows). A decode step is memory-bound: what batching across
sessions should save is the weight streaming. oneDNN's kernels on a weight reordered once into their blocked
layout keep 8 rows at ~2x one row (0.33 / 0.76 ms), and a 32000-row LM head at 13.7 ms for 8 rows instead of 27.5.
For long prefills (hundreds of rows) they are ~10% slower than MKL. For one row MKL's dense layout is faster on
Intel (a 2816x1024 weight on one thread of an Intel Xeon: 0.63 ms dense, 0.71-0.74 ms packed), and a lone
session's decode steps are all one row. So the layout follows the load (:func:`next_layout`): packed while calls
carry a few rows, call after call (batched decode steps, speculative checks), dense after a run of one-row calls.
One layout is kept at a time (both would double the memory); a switch reorders the weight in place, once.

Results agree with ``F.linear`` to float32 rounding (a different summation order), like any other kernel choice.
Autograd reaches the inputs (and the bias) through :class:`_PackedLinearFunction`; the weight is frozen, as every
weight a server or a client's head holds is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


DENSE_AFTER = 16  # one-row calls in a row after which a packed weight goes back to the dense layout
PACK_AFTER = 3  # calls of 2..PACKED_MAX_ROWS rows in a row after which a dense weight is packed
PACKED_MAX_ROWS = 64  # calls of 2..this many rows want the packed layout; longer ones (prefill) do not vote


def next_layout(packed: bool, streak: int, rows: int) -> tuple[bool, int]:
    """The layout after a call of ``rows`` rows: ``(packed, streak)``, ``streak`` counting the calls in a row of
    one kind: ``n > 0`` one-row calls, ``-n < 0`` calls of a few rows.

    A switch reorders every weight of a server (~150 ms for the bench's 4 blocks), so only a load that lasts moves
    it. ``PACK_AFTER`` batched calls in a row pack a dense weight: batched decode steps and speculative checks
    come every step, while a short prompt's prefill is one call, and packing for it would cost a lone session
    two switches per generation (the second ``DENSE_AFTER`` steps later). ``DENSE_AFTER`` one-row calls in a
    row unpack, so sessions whose steps batch only some of the time keep the packed layout. Long prefills do not
    vote."""
    if rows <= 1:
        streak = max(streak, 0) + 1
        if packed and streak >= DENSE_AFTER:
            return False, 0
        return packed, streak
    if rows <= PACKED_MAX_ROWS:
        if packed:
            return True, 0
        streak = min(streak, 0) - 1
        if -streak >= PACK_AFTER:
            return True, 0
        return False, streak
    return packed, streak


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight takes oneDNN's blocked layout under batched calls and PyTorch's dense
    layout under one-row calls (see the module docstring); ``adaptive=False`` keeps it packed.

    The weight is a non-persistent buffer (it counts in :func:`potluck.models.quant.module_bytes`); the bias
    stays an ordinary parameter. ``weight`` returns the dense weight (a copy while packed) for the rare reader.
    """

    stored_weight: torch.Tensor

    def __init__(self, linear: nn.Linear, adaptive: bool = True) -> None:
        super().__init__()
        if not prepack_supported(linear.weight.dtype, linear.weight.device):
            raise ValueError(
                f"cannot prepack a {linear.weight.dtype} weight on {linear.weight.device} (fp32 on CPU with oneDNN)"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.adaptive = adaptive
        # adaptive layers start dense (a new server or client has no load yet); batched calls pack them
        self.packed, self.streak = not adaptive, 0  # streak: see next_layout
        weight = linear.weight.detach()  # [out, in]
        stored = _MKLDNN._reorder_linear_weight(weight, None) if self.packed else weight.clone()
        self.register_buffer("stored_weight", stored, persistent=False)
        self.bias = linear.bias
        self.switches = 0  # layout changes so far (for tests and logs)

    @property
    def weight(self) -> torch.Tensor:
        return self.stored_weight.to_dense() if self.packed else self.stored_weight  # [out, in]

    def set_packed(self, packed: bool) -> None:
        """Reorder the weight into the packed (or the dense) layout; nothing if it is there already."""
        if packed == self.packed:
            return
        # a normal tensor even inside inference_mode: a later forward with autograd may save it for backward
        with torch.inference_mode(False), torch.no_grad():
            weight = self.stored_weight
            self.stored_weight = (
                _MKLDNN._reorder_linear_weight(weight, None) if packed else weight.to_dense()
            )  # [out, in]
        self.packed = packed
        self.switches += 1

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={'packed' if self.packed else 'dense'}{' (adaptive)' if self.adaptive else ''}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"a prepacked linear takes float32 CPU inputs, got {x.dtype} on {x.device}")
        if self.adaptive:
            packed, self.streak = next_layout(self.packed, self.streak, x.numel() // self.in_features)
            self.set_packed(packed)
        if not self.packed:
            return F.linear(x, self.stored_weight, self.bias)  # [..., out]
        x = x.contiguous()  # [..., in]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if needs_grad:
            return _PackedLinearFunction.apply(x, self.stored_weight, self.bias)  # type: ignore[no-any-return]
        return _MKLDNN._linear_pointwise(x, self.stored_weight, self.bias, "none", [], "")  # [..., out]


def prepack_linears(module: nn.Module, adaptive: bool = True) -> int:
    """Replace every fp32 CPU ``nn.Linear`` inside ``module`` by a :class:`PackedLinear`; returns how many.

    Does nothing where :func:`prepack_supported` says no (other dtypes, GPUs, quantized layers, which are not
    ``nn.Linear``). The weights must be frozen: a packed weight gets no gradient.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and prepack_supported(child.weight.dtype, child.weight.device):
                setattr(parent, name, PackedLinear(child, adaptive))
                count += 1
    return count
