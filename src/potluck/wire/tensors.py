"""Tensor metadata, receiver limits, and single-tensor encode/decode.

A tensor travels as a ``TensorMeta`` (in the frame header) plus a flat byte payload of exactly
``meta.nbytes`` bytes. ``meta.dtype``/``meta.shape`` describe the tensor the receiver gets back; the payload
layout follows from them and ``meta.compression`` (+ ``block_size`` for int8), see ``compression.py``.

Receivers call ``check_meta`` before allocating anything: every field a peer controls is bounded by
``WireLimits`` and must be self-consistent, otherwise ``TensorLimitError`` names the field and the limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict

from potluck.wire.compression import (
    INT8_BLOCK_SIZE,
    MAX_INT8_BLOCK_SIZE,
    compress,
    decompress,
    effective_compression,
    payload_nbytes,
)
from potluck.wire.errors import ProtocolError, TensorLimitError
from potluck.wire.messages import Compression

# The only dtypes that ever cross the wire (names as in ``str(torch.float32)`` minus "torch.").
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}

MiB = 1 << 20
GiB = 1 << 30


class TensorMeta(BaseModel):
    """Header entry of one tensor. Strict: the JSON must carry real ints/strings, no coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    dtype: str  # dtype of the decoded tensor, one of WIRE_DTYPES (checked by check_meta, not here)
    shape: tuple[int, ...]  # shape of the decoded tensor; () is a 0-dim scalar
    compression: Compression = "none"
    nbytes: int  # exact size of the wire payload
    block_size: int | None = None  # int8 only: values per absmax block


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts. Defaults fit hidden states [B, T, H] and prompts [n, B, P, H]."""

    max_ndim: int = 5
    max_elements: int = 1 << 28  # per tensor (256 Mi values = 1 GiB as fp32)
    max_bytes: int = 512 * MiB  # wire payload per tensor
    max_tensors: int = 64  # per message (hidden, grads, prompts, and two per LoRA target)
    max_message_bytes: int = 1 * GiB  # sum of payloads per message: bounds what a peer makes us allocate
    max_header_bytes: int = 64 * 1024
    max_chunk_bytes: int = 4 * MiB  # writers send <= 1 MiB chunks; leave headroom for other writers
    allowed_dtypes: frozenset[str] = field(default_factory=lambda: frozenset(WIRE_DTYPES))
    # shared by all streams of a server: payload bytes of frames being received at once (None: unbounded)
    inflight: InflightBudget | None = field(default=None, compare=False)


class InflightBudget:
    """A process-wide byte budget for frames being received: a frame's payload is reserved from its header, before
    any of it is buffered, and released as soon as the frame is decoded or abandoned (truncated, timed out)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()  # decode_message may run off the event loop

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.max_bytes:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)


DEFAULT_LIMITS = WireLimits()


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} cannot go on the wire; supported: {sorted(WIRE_DTYPES)}")
    return name


def check_meta(meta: TensorMeta, limits: WireLimits = DEFAULT_LIMITS) -> int:
    """Validate a peer's meta against ``limits`` and itself, before allocating; returns the element count."""
    dtype = WIRE_DTYPES.get(meta.dtype)
    if dtype is None or meta.dtype not in limits.allowed_dtypes:
        allowed = sorted(limits.allowed_dtypes & WIRE_DTYPES.keys())
        raise TensorLimitError(f"tensor dtype {meta.dtype!r} is not allowed (allowed: {allowed})")
    shape = meta.shape
    if len(shape) > limits.max_ndim:
        raise TensorLimitError(f"tensor ndim {len(shape)} exceeds max_ndim={limits.max_ndim}")
    numel = 1
    nonzero_numel = 1  # torch computes strides from the non-zero dims: bound them too, even if numel is 0
    for d in shape:
        if d < 0:
            raise TensorLimitError(f"tensor shape {shape} has a negative dimension")
        numel *= d
        nonzero_numel *= max(d, 1)
    if nonzero_numel > limits.max_elements:
        raise TensorLimitError(
            f"tensor shape {shape} has {nonzero_numel} elements, exceeds max_elements={limits.max_elements}"
        )
    if meta.nbytes < 0 or meta.nbytes > limits.max_bytes:
        raise TensorLimitError(f"tensor nbytes {meta.nbytes} exceeds max_bytes={limits.max_bytes}")
    comp = meta.compression
    if comp != "none" and not dtype.is_floating_point:
        raise TensorLimitError(f"compression {comp!r} applies only to floating dtypes, got {meta.dtype!r}")
    if comp == "int8":
        bs = meta.block_size
        if bs is None or not 0 < bs <= MAX_INT8_BLOCK_SIZE:
            raise TensorLimitError(f"int8 block_size {bs} must be in [1, {MAX_INT8_BLOCK_SIZE}]")
    elif meta.block_size is not None:
        raise TensorLimitError(f"block_size is only valid with int8 compression, got {comp!r}")
    expected = payload_nbytes(comp, dtype, numel, meta.block_size)
    if meta.nbytes != expected:
        raise TensorLimitError(
            f"tensor nbytes {meta.nbytes} does not match dtype {meta.dtype}, shape {shape} and "
            f"compression {comp!r} (expected {expected})"
        )
    return numel


def encode_tensor(
    t: torch.Tensor, compression: str = "none", *, block_size: int = INT8_BLOCK_SIZE
) -> tuple[TensorMeta, memoryview]:
    """Encode ``t`` (any device, any strides, bf16 included) into ``(meta, payload)``.

    ``compression`` is a request: it is applied only to floating tensors and only when it shrinks them
    (``meta.compression`` says what was used). With ``none``, a contiguous CPU tensor's payload aliases its
    memory: do not modify ``t`` until the payload has been written.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"only dense (strided) tensors can go on the wire, got layout {t.layout}")
    name = dtype_name(t.dtype)
    comp = effective_compression(t.dtype, compression)
    payload = compress(t, comp, block_size)  # [nbytes] uint8, CPU
    meta = TensorMeta(
        dtype=name,
        shape=tuple(t.shape),
        compression=comp,
        nbytes=payload.numel(),
        block_size=block_size if comp == "int8" else None,
    )
    return meta, byte_view(payload)


def byte_view(payload: torch.Tensor) -> memoryview:
    """Zero-copy writable memoryview of a flat uint8 CPU tensor (keeps the tensor alive)."""
    # a uint8 view through numpy is the cheapest buffer-protocol export (bf16 never meets numpy)
    return memoryview(payload.numpy())  # type: ignore[arg-type]


def _payload_tensor(data: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """The payload as a flat, writable uint8 CPU tensor; copies only read-only buffers."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1 or data.device.type != "cpu":
            raise TypeError("a tensor payload must be a 1-D uint8 CPU tensor")
        return data.contiguous()
    mv = memoryview(data).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8)
    if mv.readonly:
        # the decoded tensor must own writable memory; torch.frombuffer on bytes would alias immutable data
        mv = memoryview(bytearray(mv))
    return torch.frombuffer(mv, dtype=torch.uint8)


def decode_tensor(
    meta: TensorMeta,
    data: torch.Tensor | bytes | bytearray | memoryview,
    limits: WireLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Decode one payload into a CPU tensor of ``meta.dtype``/``meta.shape`` after validating ``meta``.

    With ``none`` the result shares memory with a writable ``data`` (bytearray / uint8 tensor).
    """
    check_meta(meta, limits)
    payload = _payload_tensor(data)  # [nbytes] uint8
    return decode_checked(meta, payload)


def decode_checked(meta: TensorMeta, payload: torch.Tensor) -> torch.Tensor:
    """``decode_tensor`` for a meta that already passed ``check_meta`` and a flat uint8 CPU payload."""
    if payload.numel() != meta.nbytes:
        raise ProtocolError(f"tensor payload has {payload.numel()} bytes, meta says {meta.nbytes}")
    dtype = WIRE_DTYPES[meta.dtype]
    if dtype is torch.bool and meta.nbytes and bool(payload.gt(1).any()):
        # any byte other than 0/1 is not a valid torch bool (undefined behaviour downstream)
        raise ProtocolError("bool tensor payload contains bytes other than 0 and 1")
    return decompress(payload, meta.compression, dtype, meta.shape, meta.block_size)
