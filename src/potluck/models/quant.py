"""Quantized blocks: a span's linear layers in int8 (LLM.int8) or 4-bit NF4, with bitsandbytes.

The blocks' code stays the same; after a block's weights are loaded, every ``nn.Linear`` inside it is replaced by
the bitsandbytes module transformers' ``BitsAndBytesConfig`` would create, built and quantized the same way
(``transformers.integrations.bitsandbytes.replace_with_bnb_linear`` and the ``Bnb8bitQuantize`` /
``Bnb4bitQuantize`` loading ops), so a quantized span computes exactly what transformers' quantized model does:

* ``int8``: ``bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=6.0)``; the weight, cast to the span's
  dtype, is quantized row-wise by ``Int8Params`` (via fp16, as bitsandbytes does) when moved to the device.
* ``nf4``: ``bnb.nn.Linear4bit(compute_dtype=span dtype, quant_type="nf4", compress_statistics=False,
  quant_storage=uint8)``; blocksize 64 (bitsandbytes' default), no double quantization (transformers' default).
  The oracle is ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=<span dtype>)``.

Norms stay in the span's dtype; embeddings, the final norm and the LM head live on the client and are never
quantized. Gradients flow to the inputs (prompt tuning, client-owned LoRA) through both module types; the
quantized weights themselves are frozen.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

QuantMode = Literal["none", "int8", "nf4"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "nf4")
QUANT_CHOICES: tuple[str, ...] = (*QUANT_MODES, "auto")  # what `potluck serve --quant` accepts

NF4_BLOCKSIZE = 64  # bitsandbytes' default blocksize for 4-bit weights (what transformers uses)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold, BitsAndBytesConfig's llm_int8_threshold default


class QuantizationError(ValueError):
    """A quantization mode is unknown, or bitsandbytes cannot quantize this layer here."""


def check_quant(mode: str) -> QuantMode:
    """``mode`` if it is one of none / int8 / nf4, else QuantizationError."""
    if mode not in QUANT_MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    return mode  # type: ignore[return-value]


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise QuantizationError("quantized blocks need bitsandbytes (pip install bitsandbytes)") from e
    return bnb


def quantize_linear(
    linear: nn.Linear, mode: QuantMode, device: torch.device | str, compute_dtype: torch.dtype
) -> nn.Module:
    """A bitsandbytes copy of ``linear`` (weights on any device, in ``compute_dtype``) quantized on ``device``."""
    bnb = _bnb()
    device = torch.device(device)
    has_bias = linear.bias is not None
    weight = linear.weight.detach().to(dtype=compute_dtype)  # [out, in]
    new: nn.Module
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
            threshold=INT8_THRESHOLD, device="meta",
        )  # fmt: skip
        # Int8Params quantizes when it moves from CPU to a device (transformers: Bnb8bitQuantize)
        new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(
            device
        )
    elif mode == "nf4":
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, has_bias, compute_dtype, compress_statistics=False,
            quant_type="nf4", quant_storage=torch.uint8, device="meta",
        )  # fmt: skip
        # Params4bit quantizes on its first move to a device (transformers: Bnb4bitQuantize)
        new.weight = bnb.nn.Params4bit(
            weight.to(device), requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
            quant_type="nf4", quant_storage=torch.uint8, module=new,
        ).to(device)  # fmt: skip
        keep_nf4_in_compute_dtype(new)
    else:
        raise QuantizationError(f"cannot quantize a linear layer to {mode!r}")
    if has_bias:
        assert linear.bias is not None
        new.bias = nn.Parameter(
            linear.bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False
        )
    new.requires_grad_(False)
    return new


def keep_nf4_in_compute_dtype(module: nn.Module) -> int:
    """Turn off bitsandbytes' fused bf16 NF4 kernel for CPU inference in every fp32 ``Linear4bit`` of ``module``;
    returns how many.

    Why: on CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight at its first inference
    call and from then on computes every call, training included, in bf16, whatever the compute dtype. Results
    then depend on the rows of the call (measured on an Intel Xeon: logits differ by up to 0.018 between a 24-row
    and a 2-row call), so a session's tokens would depend on which other sessions share its batch, and a step would
    differ from the same tokens in a prefill. fp32 spans keep bitsandbytes' fp32 path (dequantize, then matmul),
    as on every other CPU.
    """
    count = 0
    for layer in module.modules():
        if type(layer).__name__ == "Linear4bit" and getattr(layer, "compute_dtype", None) == torch.float32:
            setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010 - an attribute nn.Module does not declare
            count += 1
    return count


def _linear_paths(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if type(child) is nn.Linear]


def quantize_module(
    module: nn.Module, mode: QuantMode, device: torch.device | str, compute_dtype: torch.dtype
) -> nn.Module:
    """Replace every plain ``nn.Linear`` inside ``module`` (in place) by its quantized copy; returns ``module``.

    ``mode="none"`` leaves it as it is. Each original weight is dropped right after its copy is made, so the peak
    memory is one unquantized layer more than the quantized module.
    """
    mode = check_quant(mode)
    if mode == "none":
        return module
    for path in _linear_paths(module):
        linear = module.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        try:
            new = quantize_linear(linear, mode, device, compute_dtype)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise QuantizationError(
                f"bitsandbytes cannot quantize {path} ({linear.in_features}->{linear.out_features}) to {mode} "
                f"on {device}: {e}"
            ) from e
        module.set_submodule(path, new)
    return module


_BNB_LAYERS: dict[str, QuantMode] = {"Linear8bitLt": "int8", "Linear4bit": "nf4"}


def module_quant(module: nn.Module) -> QuantMode:
    """The quantization of the linear layers inside ``module`` (``none`` when there are no bnb layers).

    Looks at class names so that unquantized servers never pay for importing bitsandbytes.
    """
    for child in module.modules():
        cls = type(child)
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in _BNB_LAYERS:
            return _BNB_LAYERS[cls.__name__]
    return "none"


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of the weights ``module`` holds in memory, including quantization statistics (absmax, SCB)."""
    total = 0
    seen: set[int] = set()
    for sub in module.modules():
        for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t)
        weight = getattr(sub, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:  # 4-bit: per-block absmax (+ nested statistics with double quantization)
            total += _tensor_bytes(qs.absmax) + _tensor_bytes(getattr(qs, "code", None))
            if getattr(qs, "state2", None) is not None:
                total += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code)
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):  # int8: one fp32 scale per output row
            total += _tensor_bytes(scb)
    return total


def linear_bytes(
    in_features: int, out_features: int, has_bias: bool, mode: QuantMode, dtype: torch.dtype
) -> int:
    """Bytes one linear layer takes in ``mode`` (weights + statistics + bias); matches :func:`module_bytes`."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    numel = in_features * out_features
    bias = out_features * dtype_bytes if has_bias else 0
    if mode == "none":
        return numel * dtype_bytes + bias
    if mode == "int8":
        return numel + 4 * out_features + bias  # int8 weight + fp32 row scales
    blocks = -(-numel // NF4_BLOCKSIZE)
    return (numel + 1) // 2 + 4 * blocks + 16 * 4 + bias  # packed nibbles + fp32 absmax + the 16-value code


def quantized_block_bytes(block: nn.Module, mode: QuantMode, dtype: torch.dtype) -> int:
    """Bytes one block (built on any device, meta included) would take with its linear layers in ``mode``."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    total = 0
    for sub in block.modules():
        if type(sub) is nn.Linear:
            total += linear_bytes(sub.in_features, sub.out_features, sub.bias is not None, mode, dtype)
        elif not isinstance(sub, nn.Linear):  # norms and other own tensors stay in ``dtype``
            own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
            total += sum(t.numel() for t in own) * dtype_bytes
    return total
