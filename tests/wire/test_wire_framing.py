"""Frame encode/decode over bytes, asyncio StreamReader and a loopback TCP connection; garbage rejection."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest
import torch

from potluck.wire import (
    MAGIC,
    BackwardRequest,
    ErrorReply,
    ForwardRequest,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    Message,
    OpenInference,
    ProtocolError,
    StreamClosed,
    TensorLimitError,
    Tuning,
    WireLimits,
    decode_message,
    encode_message,
    read_message,
    write_message,
)

MiB = 1 << 20
STEP = InferenceStep(step_id=3, position=17, hypo_ids=[1, 0])


class RecordingWriter:
    """StreamWriter stand-in: keeps every write and counts drains."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.drains = 0

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        self.drains += 1

    def data(self) -> bytes:
        return b"".join(self.writes)


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def read_bytes(data: bytes, limits: WireLimits | None = None) -> tuple[Message, list[torch.Tensor]]:
    async def go() -> tuple[Message, list[torch.Tensor]]:
        return await read_message(reader_of(data), limits or WireLimits())

    return asyncio.run(go())


def frame(header: Any, payload: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """A frame with a hand-made header; ``payload`` is appended as-is (include chunk prefixes yourself)."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(h)) + h + payload


def chunk(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def header(kind: str = "forward_result", body: Any = None, tensors: Any = ()) -> dict[str, Any]:
    return {"kind": kind, "body": {"kind": kind} if body is None else body, "tensors": list(tensors)}


F32_META = {"dtype": "float32", "shape": [2, 2], "compression": "none", "nbytes": 16, "block_size": None}


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        InfoRequest(),
        InfoResponse(
            version="0.1",
            model="m",
            start=0,
            end=4,
            dtype="bfloat16",
            cache_tokens_left=10,
            max_batch_tokens=8,
            max_inference_length=2048,
            state="online",
        ),  # fmt: skip
        OpenInference(model="m", start=1, end=3, max_length=128, batch_size=2, alloc_timeout=1.5),
        STEP,
        ForwardRequest(model="m", start=0, end=2, tuning=Tuning(has_prompts=True), output_compression="int8"),
        ErrorReply(code="cache_full", message="no room \u2603", retryable=True),
    ],
)
def test_message_roundtrip_sync_and_async(msg: Message) -> None:
    tensors = [torch.randn(2, 3, 8), torch.arange(5), torch.zeros(0, 4), torch.tensor(True)]
    data = b"".join(encode_message(msg, tensors))
    for got, out in (decode_message(data), read_bytes(data)):
        assert got == msg and type(got) is type(msg)
        assert len(out) == len(tensors)
        for a, b in zip(out, tensors, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16", "int8"])
def test_compressed_message_roundtrip(compression: str) -> None:
    hidden = torch.randn(2, 5, 64)  # [B, T, H]
    prompts = torch.randn(3, 2, 4, 64).to(torch.bfloat16)  # [n, B, P, H]
    ids = torch.arange(10).view(2, 5)
    msg = BackwardRequest(model="m", start=0, end=1, tuning=Tuning(has_prompts=True))
    got, (h, p, i) = decode_message(b"".join(encode_message(msg, [hidden, prompts, ids], compression)))
    assert got == msg and h.dtype == torch.float32 and p.dtype == torch.bfloat16 and torch.equal(i, ids)
    tol = {"none": 0, "fp16": 2e-3, "bf16": 2e-2, "int8": 3e-2}[compression]
    assert (h - hidden).abs().max().item() <= tol
    assert (p.float() - prompts.float()).abs().max().item() <= max(tol, 0.0)


def test_small_message_is_one_write_and_one_drain() -> None:
    writer = RecordingWriter()
    asyncio.run(write_message(writer, STEP, [torch.randn(1, 1, 1024)]))
    assert len(writer.writes) == 1 and writer.drains == 1
    msg, (t,) = decode_message(writer.data())
    assert msg == STEP and t.shape == (1, 1, 1024)


def parse_chunks(data: bytes) -> list[int]:
    """Chunk lengths of a single-tensor frame (test-side independent parser of the layout)."""
    assert data[:4] == MAGIC
    (hlen,) = struct.unpack(">I", data[4:8])
    pos, sizes = 8 + hlen, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        sizes.append(n)
        pos += 4 + n
    assert pos == len(data)
    return sizes


def test_10mib_tensor_streams_in_bounded_chunks() -> None:
    t = torch.randn(10 * MiB // 4)  # [2.6M] fp32 = 10 MiB
    writer = RecordingWriter()
    asyncio.run(write_message(writer, STEP, [t]))
    data = writer.data()
    sizes = parse_chunks(data)
    assert len(sizes) >= 10 and max(sizes) <= MiB and sum(sizes) == 10 * MiB
    assert writer.drains >= 10  # drained between chunks, memory stays bounded
    assert max(len(w) for w in writer.writes) <= MiB
    msg, (out,) = read_bytes(data)
    assert msg == STEP and torch.equal(out, t)


def test_custom_chunk_size_and_limits() -> None:
    t = torch.arange(1000, dtype=torch.int32)
    data = b"".join(encode_message(STEP, [t], chunk_size=1000))
    assert parse_chunks(data) == [1000] * 4
    assert torch.equal(decode_message(data)[1][0], t)
    for bad in (0, 4 * MiB + 1):
        with pytest.raises(ValueError, match="chunk_size"):
            encode_message(STEP, [t], chunk_size=bad)


def test_header_too_big_to_send() -> None:
    with pytest.raises(ValueError, match="max_header_bytes"):
        encode_message(InferenceStep(step_id=0, position=0, hypo_ids=list(range(20000))))


def test_tcp_loopback_echo() -> None:
    """A real asyncio TCP connection: several messages both ways, a 16 MiB one, then a clean close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg, tensors = await read_message(reader, timeout=10)
                await write_message(writer, msg, [x * 2 for x in tensors])
        except StreamClosed:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for t in (torch.randn(1, 1, 32), torch.randn(4 * MiB), torch.randn(2, 3).to(torch.bfloat16)):
            await write_message(writer, STEP, [t])
            msg, (out,) = await read_message(reader, timeout=10)
            assert msg == STEP and torch.equal(out, t * 2)
        writer.write_eof()
        with pytest.raises(StreamClosed):
            await read_message(reader, timeout=10)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# --- EOF, truncation, timeout ---------------------------------------------------------------------------


def test_clean_eof_is_stream_closed() -> None:
    with pytest.raises(StreamClosed):
        read_bytes(b"")
    with pytest.raises(ProtocolError, match="truncated"):
        decode_message(b"")  # a sync buffer has no "clean close": it just is not a frame


def test_truncated_anywhere_is_protocol_error() -> None:
    data = b"".join(encode_message(STEP, [torch.randn(300)], chunk_size=512))
    (hlen,) = struct.unpack(">I", data[4:8])
    cuts = {
        3: "frame prefix",
        8 + hlen // 2: "header",
        8 + hlen + 2: "chunk length of tensor 0",
        8 + hlen + 4 + 100: "chunk of tensor 0",
        len(data) - 1: "chunk of tensor 0",
    }
    for cut, what in cuts.items():
        with pytest.raises(ProtocolError, match=f"truncated frame: expected \\d+ bytes of {what}"):
            read_bytes(data[:cut])
        with pytest.raises(ProtocolError, match=f"truncated frame: expected \\d+ bytes of {what}"):
            decode_message(data[:cut])


def test_trailing_bytes_rejected_by_sync_decode() -> None:
    data = b"".join(encode_message(STEP))
    with pytest.raises(ProtocolError, match="1 trailing bytes"):
        decode_message(data + b"\0")


def test_two_frames_back_to_back_on_one_stream() -> None:
    data = b"".join(encode_message(STEP, [torch.ones(2)])) + b"".join(encode_message(InfoRequest()))

    async def go() -> None:
        reader = reader_of(data)
        assert (await read_message(reader))[0] == STEP
        assert (await read_message(reader))[0] == InfoRequest()
        with pytest.raises(StreamClosed):
            await read_message(reader)

    asyncio.run(go())


def test_timeout() -> None:
    async def go() -> None:
        with pytest.raises(TimeoutError):
            await read_message(reader_of(b"PLK", eof=False), timeout=0.05)

    asyncio.run(go())


# --- garbage --------------------------------------------------------------------------------------------

GARBAGE: dict[str, tuple[bytes, type[Exception], str]] = {
    "random bytes": (bytes(range(7, 250)), ProtocolError, "bad frame magic"),
    "wrong magic": (b"PLK2" + frame(header())[4:], ProtocolError, "bad frame magic b'PLK2'"),
    "http": (b"GET / HTTP/1.1\r\n\r\n", ProtocolError, "bad frame magic"),
    "header too long": (MAGIC + struct.pack(">I", 65537) + b"{}", ProtocolError, "exceeds max_header_bytes"),
    "header not json": (frame(None, raw_header=b"{kind: 1}"), ProtocolError, "malformed frame header"),
    "header not utf8": (frame(None, raw_header=b'{"kind":"\xff"}'), ProtocolError, "malformed frame header"),
    "header too deep": (frame(None, raw_header=b"[" * 5000), ProtocolError, "malformed frame header"),
    "empty header": (frame(None, raw_header=b""), ProtocolError, "malformed frame header"),
    "header is a list": (frame([1, 2]), ProtocolError, "malformed frame header"),
    "missing tensors": (frame({"kind": "info_request", "body": {}}), ProtocolError, "tensors"),
    "extra header field": (frame({**header(), "x": 1}), ProtocolError, "x"),
    "unknown kind": (
        frame(header("launch_missiles")),
        ProtocolError,
        "unknown message kind 'launch_missiles'",
    ),
    "kind not a string": (frame(header(kind=5, body={})), ProtocolError, "kind"),  # type: ignore[arg-type]
    "body not an object": (frame(header(body=[1])), ProtocolError, "body"),
    "body kind mismatch": (
        frame(header(body={"kind": "error"})),
        ProtocolError,
        "malformed 'forward_result'",
    ),
    "body field wrong type": (
        frame(header("inference_step", {"step_id": "x", "position": 0})),
        ProtocolError,
        "malformed 'inference_step'",
    ),
    "body unknown field": (frame(header(body={"evil": 1})), ProtocolError, "malformed 'forward_result'"),
    "tensors not a list": (frame(header(tensors="ab")), ProtocolError, "tensors"),
    "shape as string": (frame(header(tensors=[{**F32_META, "shape": "2,2"}])), ProtocolError, "shape"),
    "shape with bool": (frame(header(tensors=[{**F32_META, "shape": [2, True]}])), ProtocolError, "shape"),
    "nbytes as float": (frame(header(tensors=[{**F32_META, "nbytes": 16.0}])), ProtocolError, "nbytes"),
    "bad compression": (
        frame(header(tensors=[{**F32_META, "compression": "zip"}])),
        ProtocolError,
        "compression",
    ),
    "meta extra field": (frame(header(tensors=[{**F32_META, "pickle": 1}])), ProtocolError, "pickle"),
    "negative dim": (
        frame(header(tensors=[{**F32_META, "shape": [-2, -2]}])),
        TensorLimitError,
        "tensor 0: tensor shape \\(-2, -2\\) has a negative dimension",
    ),
    "shape nbytes mismatch": (
        frame(header(tensors=[{**F32_META, "nbytes": 20}]), chunk(b"\0" * 20)),
        TensorLimitError,
        "nbytes 20 does not match",
    ),
    "complex64": (frame(header(tensors=[{**F32_META, "dtype": "complex64"}])), TensorLimitError, "complex64"),
    "object dtype": (frame(header(tensors=[{**F32_META, "dtype": "object"}])), TensorLimitError, "'object'"),
    "too many elements": (
        frame(header(tensors=[{**F32_META, "shape": [1 << 20, 1 << 20], "nbytes": 1 << 42}])),
        TensorLimitError,
        "exceeds max_elements",
    ),
    "huge ints": (
        frame(header(tensors=[{**F32_META, "shape": [10**40], "nbytes": 4 * 10**40}])),
        TensorLimitError,
        "exceeds max_elements",
    ),
    "too many tensors": (frame(header(tensors=[F32_META] * 65)), TensorLimitError, "max_tensors=64"),
    "too many dims": (
        frame(header(tensors=[{**F32_META, "shape": [1] * 6, "nbytes": 4}])),
        TensorLimitError,
        "max_ndim=5",
    ),
    "message too big": (
        frame(header(tensors=[{**F32_META, "shape": [1 << 27], "nbytes": 1 << 29}] * 3)),
        TensorLimitError,
        "max_message_bytes",
    ),
    "chunk too large": (
        frame(
            header(tensors=[{**F32_META, "shape": [1 << 21], "nbytes": 1 << 23}]), struct.pack(">I", 5 << 20)
        ),
        ProtocolError,
        "bad chunk length 5242880",
    ),
    "empty chunk": (
        frame(header(tensors=[F32_META]), struct.pack(">I", 0)),
        ProtocolError,
        "bad chunk length 0",
    ),
    "chunk past payload": (
        frame(header(tensors=[F32_META]), chunk(b"\0" * 20)),
        ProtocolError,
        "bad chunk length 20 .* 16 payload bytes left",
    ),
    "bad bool bytes": (
        frame(header(tensors=[{**F32_META, "dtype": "bool", "nbytes": 4}]), chunk(b"\0\1\7\0")),
        ProtocolError,
        "bool tensor payload",
    ),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_is_rejected_clearly(case: str) -> None:
    data, exc, pattern = GARBAGE[case]
    for decode in (decode_message, read_bytes):
        with pytest.raises(exc, match=pattern):
            decode(data)


def test_handmade_valid_frame_decodes() -> None:
    """The layout in the docstring is the layout: a frame built by hand from it decodes."""
    payload = struct.pack("<4f", 1, 2, 3, 4)
    msg, (t,) = decode_message(frame(header(tensors=[F32_META]), chunk(payload[:5]) + chunk(payload[5:])))
    assert msg.kind == "forward_result"  # type: ignore[attr-defined]
    assert t.tolist() == [[1, 2], [3, 4]]
