"""Lossy tensor codecs for the wire, written in plain torch (no hivemind codecs: they break with numpy>=2.4).

Every codec turns a tensor into a flat ``uint8`` payload and back; the receiver learns the original dtype,
shape and codec parameters from the tensor's ``TensorMeta`` (see ``tensors.py``).

* ``none``: the raw bytes of the tensor (any wire dtype).
* ``fp16`` / ``bf16``: cast on encode, cast back to the original dtype on decode. fp16 saturates at
  +-65504 (values beyond, infinities included, are clamped) rather than overflowing to inf.
* ``int8``: blockwise absmax quantisation. The flat tensor is split into blocks of ``block_size`` values
  (the last block may be shorter); each block stores its fp32 absmax and ``round(x / absmax * 127)`` as
  int8. Payload layout: ``[absmax fp32 x n_blocks][q int8 x numel]`` (scales first, so both views stay
  aligned). Max abs error per value is ``absmax_of_its_block / 254``. An all-zero block has absmax 0 and
  decodes to zeros; a NaN/inf value poisons (only) its own block.

Compression applies only to floating tensors, and only when it shrinks them: integer/bool tensors, or an
fp16 tensor asked to go as bf16, are sent as ``none`` (``effective_compression``).
"""

from __future__ import annotations

from typing import get_args

import torch

from potluck.wire.messages import Compression

COMPRESSIONS: tuple[str, ...] = get_args(Compression)

# 2048 values: 0.2% scale overhead. Smaller blocks localise outliers (LLM hidden states have a few huge
# channels) at the price of more scales; the block size travels in the meta, so receivers decode any.
INT8_BLOCK_SIZE = 2048
MAX_INT8_BLOCK_SIZE = 1 << 24

_FP16_MAX = float(torch.finfo(torch.float16).max)
_CAST_TARGET: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FLOATING = (torch.float32, torch.float16, torch.bfloat16)


def effective_compression(dtype: torch.dtype, compression: str) -> Compression:
    """The codec actually used for a tensor of ``dtype`` when ``compression`` is asked for."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}, expected one of {COMPRESSIONS}")
    if compression == "none" or dtype not in _FLOATING:
        return "none"
    target = _CAST_TARGET.get(compression)
    if target is not None and target.itemsize >= dtype.itemsize:
        return "none"  # casting would not shrink it (fp16 <-> bf16 would only lose precision/range)
    return compression  # type: ignore[return-value]


def payload_nbytes(compression: str, dtype: torch.dtype, numel: int, block_size: int | None) -> int:
    """Exact wire payload size of a tensor; the reader checks the header's ``nbytes`` against this."""
    if compression == "none":
        return numel * dtype.itemsize
    if compression in _CAST_TARGET:
        return numel * _CAST_TARGET[compression].itemsize
    if compression == "int8":
        assert block_size is not None and block_size > 0
        return 4 * _num_blocks(numel, block_size) + numel
    raise ValueError(f"unknown compression {compression!r}")


def _num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 CPU tensor (zero-copy when already on CPU)."""
    return t.cpu().reshape(-1).view(torch.uint8)  # [numel * itemsize]


def compress(t: torch.Tensor, compression: Compression, block_size: int = INT8_BLOCK_SIZE) -> torch.Tensor:
    """Encode ``t`` (any device, any strides) with ``compression`` into a flat uint8 CPU payload.

    The codec runs on ``t``'s device so a GPU tensor crosses PCIe already compressed. For ``none`` on a
    contiguous CPU tensor the payload aliases ``t``'s memory (no copy).
    """
    t = t.detach()
    if compression == "none":
        return _flat_bytes(t.contiguous())
    if t.dtype not in _FLOATING:
        raise ValueError(f"compression {compression!r} applies only to floating tensors, got {t.dtype}")
    target = _CAST_TARGET.get(compression)
    if target is not None:
        # contiguous_format: a plain .to() keeps a transposed tensor's strides, but we need the C order
        out = t.to(target, memory_format=torch.contiguous_format)
        if target is torch.float16:
            out.clamp_(-_FP16_MAX, _FP16_MAX)  # saturate instead of inf (NaN stays NaN)
        return _flat_bytes(out)
    if compression == "int8":
        return _quantize_int8(t, block_size)
    raise ValueError(f"unknown compression {compression!r}")


def decompress(
    payload: torch.Tensor,
    compression: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    block_size: int | None,
) -> torch.Tensor:
    """Inverse of ``compress``. ``payload`` is a flat uint8 CPU tensor whose size the caller has checked.

    For ``none`` the result is a zero-copy view of ``payload``.
    """
    if compression == "none":
        return payload.view(dtype).view(shape)
    target = _CAST_TARGET.get(compression)
    if target is not None:
        return payload.view(target).view(shape).to(dtype)
    if compression == "int8":
        assert block_size is not None
        return _dequantize_int8(payload, dtype, shape, block_size)
    raise ValueError(f"unknown compression {compression!r}")


# --- int8 blockwise absmax ------------------------------------------------------------------------------


def _quantize_rows(x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> None:
    """Quantise each row of ``x`` [rows, block] into ``scales`` [rows] (fp32) and ``q`` [rows, block]."""
    # amax/amin instead of abs().amax(): no temporary of the full block
    absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg())  # [rows]
    scales.copy_(absmax)
    # dividing (not multiplying by 127/absmax) keeps |x/absmax| <= 1 even for subnormal absmax;
    # all-zero rows divide by 1 and give zeros
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # [rows]
    tmp = x / safe[:, None]  # [rows, block] fp32
    tmp.mul_(127.0).round_()
    # NaN/inf (or a NaN absmax leaving huge values) must never reach the float->int8 cast, which is UB
    tmp.nan_to_num_(nan=0.0, posinf=127.0, neginf=-127.0).clamp_(-127.0, 127.0)
    q.copy_(tmp)


def _quantize_int8(t: torch.Tensor, block_size: int) -> torch.Tensor:
    if not 0 < block_size <= MAX_INT8_BLOCK_SIZE:
        raise ValueError(f"int8 block_size must be in [1, {MAX_INT8_BLOCK_SIZE}], got {block_size}")
    x = t.reshape(-1).float()  # [n] fp32; computing in fp32 keeps the scales exact for fp16/bf16 input
    n = x.numel()
    n_full, tail = divmod(n, block_size)
    n_blocks = n_full + (1 if tail else 0)
    out = torch.empty(4 * n_blocks + n, dtype=torch.uint8, device=x.device)  # [payload bytes]
    scales = out[: 4 * n_blocks].view(torch.float32)  # [n_blocks]
    q = out[4 * n_blocks :].view(torch.int8)  # [n]
    if n_full:
        split = n_full * block_size
        _quantize_rows(
            x[:split].view(n_full, block_size), scales[:n_full], q[:split].view(n_full, block_size)
        )
    if tail:
        _quantize_rows(x[n - tail :].view(1, tail), scales[n_full:], q[n - tail :].view(1, tail))
    return out.cpu()


def _dequantize_int8(
    payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], block_size: int
) -> torch.Tensor:
    n = 1  # numel from the shape (the caller checked payload size = 4 * n_blocks + n)
    for d in shape:
        n *= d
    n_full, tail = divmod(n, block_size)
    n_blocks = n_full + (1 if tail else 0)
    scales = payload[: 4 * n_blocks].view(torch.float32) / 127.0  # [n_blocks]
    q = payload[4 * n_blocks :].view(torch.int8)  # [n]
    out = torch.empty(n, dtype=torch.float32)  # [n]
    if n_full:
        split = n_full * block_size
        torch.mul(
            q[:split].view(n_full, block_size),
            scales[:n_full, None],
            out=out[:split].view(n_full, block_size),
        )
    if tail:
        torch.mul(q[n - tail :], scales[n_full], out=out[n - tail :])
    return out.view(shape).to(dtype)
