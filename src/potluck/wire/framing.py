"""Message framing over byte streams (hivemind libp2p streams / asyncio ``StreamReader``/``StreamWriter``).

Frame layout (all integers unsigned 32-bit big-endian)::

    b"PLK1"                      4-byte magic (also the format version)
    header_len                   u32, <= limits.max_header_bytes (64 KiB)
    header                       UTF-8 JSON object, exactly header_len bytes:
                                   {"kind": str, "body": {message fields}, "tensors": [TensorMeta, ...]}
    for each tensor, in header order:
        chunks                   each: u32 length (1 .. limits.max_chunk_bytes) + that many payload bytes;
                                 the lengths sum to exactly meta.nbytes (a 0-byte payload has no chunks)

``body`` is ``msg.model_dump(mode="json")`` and is validated with ``parse_message(kind, body)``; each
TensorMeta is validated against ``WireLimits`` before any payload byte is read or any buffer allocated.
Writers send chunks of <= ``chunk_size`` (1 MiB) and drain between them so memory stays bounded; readers
reject chunks above ``limits.max_chunk_bytes`` (4 MiB). No pickle, no eval: the header is data only.
A server also reserves each frame's payload from ``limits.inflight`` (a byte budget shared by all its streams)
as soon as the header is parsed, and refuses the frame when the budget is spent; the reservation and any partly
received buffer are released the moment the frame is decoded or abandoned.

Every malformed frame raises ``ProtocolError`` (``TensorLimitError`` for limit breaches); a clean EOF
before a frame raises ``StreamClosed``; EOF inside a frame is ``ProtocolError("truncated ...")``.

One frame parser (``_frame_parser``, a generator asking for byte counts) serves both the async stream
reader and the sync ``decode_message``, so the two can never disagree on what is valid.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Generator, Sequence
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from potluck.wire.errors import ProtocolError, StreamClosed, TensorLimitError
from potluck.wire.messages import Message, parse_message
from potluck.wire.tensors import (
    DEFAULT_LIMITS,
    TensorMeta,
    WireLimits,
    byte_view,
    check_meta,
    decode_checked,
    encode_tensor,
)

MAGIC = b"PLK1"
DEFAULT_CHUNK_SIZE = 1 << 20
_U32 = struct.Struct(">I")
_PREFIX = struct.Struct(">4sI")  # magic + header length
_U32_MAX = (1 << 32) - 1
# parts shorter than this are coalesced into one write; longer ones (payload chunks) are written as-is
_COALESCE_MAX = 64 * 1024

Buffer = bytes | bytearray | memoryview


class _Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class _Writer(Protocol):
    def write(self, data: Any) -> None: ...

    async def drain(self) -> None: ...


class _Header(BaseModel):
    """Outer header shape; ``body`` is validated separately by ``parse_message`` for its ``kind``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: str
    body: dict[str, Any]
    tensors: list[TensorMeta]


# --- encoding ------------------------------------------------------------------------------------------


def encode_message(
    msg: Message,
    tensors: Sequence[torch.Tensor] = (),
    compression: str = "none",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Buffer]:
    """Encode one frame as a list of buffers to write in order (``b"".join`` gives the frame bytes).

    Payload chunks are zero-copy memoryviews where possible; small control parts are merged so a small
    message is two buffers. ``compression`` applies to every floating tensor (see ``encode_tensor``).
    """
    if not 0 < chunk_size <= DEFAULT_LIMITS.max_chunk_bytes:
        raise ValueError(f"chunk_size must be in [1, {DEFAULT_LIMITS.max_chunk_bytes}], got {chunk_size}")
    kind: str = msg.kind  # type: ignore[attr-defined]  # every registered message has a literal kind
    encoded = [encode_tensor(t, compression) for t in tensors]
    # assembled by hand: model_dump_json runs in Rust and is several times faster than json.dumps(dict)
    metas = ",".join(meta.model_dump_json() for meta, _ in encoded)
    header = f'{{"kind":{json.dumps(kind)},"body":{msg.model_dump_json()},"tensors":[{metas}]}}'.encode()
    if len(header) > DEFAULT_LIMITS.max_header_bytes:
        raise ValueError(
            f"{kind} header is {len(header)} bytes, over max_header_bytes="
            f"{DEFAULT_LIMITS.max_header_bytes}: peers would reject it"
        )
    parts: list[Buffer] = []
    control = bytearray(_PREFIX.pack(MAGIC, len(header)))
    control += header
    for _, payload in encoded:
        for start in range(0, len(payload), chunk_size):
            chunk = payload[start : start + chunk_size]
            control += _U32.pack(len(chunk))
            parts.append(bytes(control))
            control.clear()
            parts.append(chunk)
    if control:
        parts.append(bytes(control))
    return parts


async def write_message(
    writer: _Writer,
    msg: Message,
    tensors: Sequence[torch.Tensor] = (),
    compression: str = "none",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Write one frame to ``writer`` (needs ``write`` and ``async drain``).

    Small parts go out in a single ``write``; payload chunks are written as-is (no join copy) with a
    ``drain`` after every ``chunk_size`` bytes, so a large tensor never piles up in the transport buffer.
    Not safe to call concurrently on one writer (frames would interleave): serialise writes per stream.
    If cancelled mid-frame the stream is left mid-frame: close it.
    """
    parts = encode_message(msg, tensors, compression, chunk_size=chunk_size)
    pending: list[Buffer] = []
    since_drain = 0
    for part in parts:
        if len(part) < _COALESCE_MAX:
            pending.append(part)
            continue
        if pending:
            writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()
        writer.write(part)
        since_drain += len(part)
        if since_drain >= chunk_size:
            await writer.drain()
            since_drain = 0
    if pending:
        writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
    await writer.drain()


# --- decoding ------------------------------------------------------------------------------------------

# The parser yields (n, what): "give me exactly n bytes" (what names them for truncation errors), is sent
# those bytes, and finally returns the message and tensors.
_Parser = Generator[tuple[int, str], Buffer, tuple[Message, list[torch.Tensor]]]


def _parse_header(raw: Buffer, limits: WireLimits) -> tuple[Message, list[TensorMeta]]:
    try:
        header = _Header.model_validate_json(raw if isinstance(raw, bytes | bytearray) else bytes(raw))
    except ValidationError as e:
        # e.g. invalid UTF-8/JSON, too deep nesting, missing or mistyped fields; keep the message short
        errors = [(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors(include_url=False)[:5]]
        raise ProtocolError(f"malformed frame header: {errors}") from None
    msg = parse_message(header.kind, header.body)
    metas = header.tensors
    if len(metas) > limits.max_tensors:
        raise TensorLimitError(f"message has {len(metas)} tensors, exceeds max_tensors={limits.max_tensors}")
    total = 0
    for i, meta in enumerate(metas):
        try:
            check_meta(meta, limits)
        except TensorLimitError as e:
            raise TensorLimitError(f"{header.kind} tensor {i}: {e}") from None
        total += meta.nbytes
    if total > limits.max_message_bytes:
        raise TensorLimitError(
            f"{header.kind} tensors total {total} bytes, exceeds max_message_bytes={limits.max_message_bytes}"
        )
    return msg, metas


def _frame_parser(limits: WireLimits) -> _Parser:
    prefix = yield _PREFIX.size, "frame prefix"
    magic, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r} (not a potluck stream?)")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(
            f"frame header of {header_len} bytes exceeds max_header_bytes={limits.max_header_bytes}"
        )
    msg, metas = _parse_header((yield header_len, "header"), limits)
    payload = sum(meta.nbytes for meta in metas)
    budget = limits.inflight
    if budget is not None and not budget.try_reserve(payload):
        raise TensorLimitError(
            f"server busy: {budget.used} of {budget.max_bytes} bytes of incoming frames in flight, "
            f"no room for {payload} more; retry later"
        )
    try:
        return msg, (yield from _read_payloads(metas, limits))
    finally:  # runs on success, on a parse error, and when the reader closes us on EOF / timeout / cancel
        if budget is not None:
            budget.release(payload)


def _read_payloads(
    metas: list[TensorMeta], limits: WireLimits
) -> Generator[tuple[int, str], Buffer, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []
    for i, meta in enumerate(metas):
        # torch.empty, not bytearray(n): no memset, pages are committed only as chunks arrive
        buf = torch.empty(meta.nbytes, dtype=torch.uint8)  # [nbytes]
        view = byte_view(buf)
        filled = 0
        while filled < meta.nbytes:
            (n,) = _U32.unpack((yield 4, f"chunk length of tensor {i}"))
            left = meta.nbytes - filled
            if n == 0 or n > limits.max_chunk_bytes or n > left:
                raise ProtocolError(
                    f"tensor {i}: bad chunk length {n} (must be 1..{limits.max_chunk_bytes} and <= the "
                    f"{left} payload bytes left of {meta.nbytes})"
                )
            view[filled : filled + n] = yield n, f"chunk of tensor {i}"
            filled += n
        tensors.append(decode_checked(meta, buf))
    return tensors


def decode_message(data: Buffer, limits: WireLimits = DEFAULT_LIMITS) -> tuple[Message, list[torch.Tensor]]:
    """Decode exactly one whole frame from ``data``; trailing bytes are a ProtocolError.

    Tensors own fresh memory (payloads are copied out of ``data``), so ``data`` can be reused.
    """
    mv = memoryview(data).cast("B")
    parser = _frame_parser(limits)
    pos = 0
    try:
        n, what = next(parser)
        while True:
            if pos + n > len(mv):
                raise ProtocolError(f"truncated frame: expected {n} bytes of {what}, got {len(mv) - pos}")
            piece = mv[pos : pos + n]
            pos += n
            n, what = parser.send(piece)
    except StopIteration as stop:
        result: tuple[Message, list[torch.Tensor]] = stop.value
    finally:
        parser.close()  # frees a partly filled payload buffer and its budget now, not at garbage collection
    if pos != len(mv):
        raise ProtocolError(f"{len(mv) - pos} trailing bytes after the frame")
    return result


async def _read_frame(reader: _Reader, limits: WireLimits) -> tuple[Message, list[torch.Tensor]]:
    parser = _frame_parser(limits)
    n, what = next(parser)
    first = True
    try:
        while True:
            try:
                data = await reader.readexactly(n)
            except asyncio.IncompleteReadError as e:
                if first and not e.partial:
                    raise StreamClosed("stream closed by the peer") from None
                raise ProtocolError(
                    f"truncated frame: expected {n} bytes of {what}, got {len(e.partial)} before EOF"
                ) from None
            first = False
            n, what = parser.send(data)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        # A truncated, timed-out or cancelled frame: close the parser so its partly filled buffers and budget are
        # released at once (the exception's traceback would otherwise keep the generator frame alive until GC).
        parser.close()
        data = b""


async def read_message(
    reader: _Reader, limits: WireLimits = DEFAULT_LIMITS, *, timeout: float | None = None
) -> tuple[Message, list[torch.Tensor]]:
    """Read one frame from ``reader`` (needs ``async readexactly``).

    Raises ``StreamClosed`` on a clean EOF before the frame, ``ProtocolError`` on anything malformed or
    truncated, ``TimeoutError`` when ``timeout`` (seconds, whole frame) runs out. After a ProtocolError or
    a timeout the stream position is undefined: close the stream.
    """
    if timeout is None:
        return await _read_frame(reader, limits)
    async with asyncio.timeout(timeout):  # no extra task per message, unlike wait_for
        return await _read_frame(reader, limits)
