"""Fuzzing: mutated frames must decode or raise ProtocolError / StreamClosed, never anything else."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from typing import Any

import torch

from potluck.wire import (
    MAGIC,
    ForwardRequest,
    ProtocolError,
    StreamClosed,
    Tuning,
    WireLimits,
    decode_message,
    encode_message,
    read_message,
)

# small limits so random size fields hit the limit checks instead of allocating much
LIMITS = WireLimits(max_bytes=1 << 20, max_message_bytes=2 << 20, max_elements=1 << 20)


def valid_frame() -> bytes:
    g = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(2, 3, 40, generator=g),  # [B, T, H]
        torch.randn(1, 2, 2, 40, generator=g).to(torch.bfloat16),  # [n, B, P, H]
        torch.tensor([True, False, True]),
        torch.arange(6, dtype=torch.int64).view(2, 3),
    ]
    msg = ForwardRequest(model="m", start=0, end=2, tuning=Tuning(has_prompts=True))
    return b"".join(encode_message(msg, tensors, "none", chunk_size=64))


def int8_frame() -> bytes:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    return b"".join(encode_message(ForwardRequest(model="m", start=0, end=1), [x, x.half()], "int8"))


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0:  # flip a few bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # overwrite a byte range with random bytes
        i = rng.randrange(len(b))
        n = rng.randint(1, 16)
        b[i : i + n] = rng.randbytes(n)
    elif op == 2:  # truncate
        del b[rng.randrange(len(b)) :]
    elif op == 3:  # insert
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    elif op == 4:  # delete a range
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 8)]
    elif op == 5:  # poke a random u32 (often a length field)
        i = rng.randrange(max(1, len(b) - 4))
        b[i : i + 4] = struct.pack(">I", rng.choice([0, 1, 4, 7, 1 << 20, (1 << 22) + 1, (1 << 32) - 1]))
    else:  # mangle the header with digits/structure characters (stays JSON-ish more often)
        hlen = struct.unpack(">I", bytes(b[4:8]))[0]
        for _ in range(rng.randint(1, 3)):
            i = 8 + rng.randrange(max(1, hlen))
            if i < len(b):
                b[i] = ord(rng.choice('0123456789-[]{}",:e.tn'))
    return bytes(b)


def check(data: bytes) -> str:
    try:
        decode_message(data, LIMITS)
        return "ok"
    except ProtocolError:
        return "protocol"


def check_async(data: bytes) -> str:
    async def go() -> str:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        try:
            await read_message(reader, LIMITS)
            return "ok"
        except (ProtocolError, StreamClosed):
            return "protocol"

    return asyncio.run(go())


def test_fuzz_byte_mutations() -> None:
    rng = random.Random(1234)
    outcomes: dict[str, int] = {"ok": 0, "protocol": 0}
    for base in (valid_frame(), int8_frame()):
        assert check(base) == "ok"
        for i in range(500):
            data = mutate(base, rng)
            outcomes[check(data)] += 1  # anything but ProtocolError propagates and fails the test
            if i % 10 == 0:
                check_async(data)
    assert outcomes["protocol"] > 100  # the mutations do reach the error paths


JSON_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, -(10**30), 1.5, float("nan"), "", "x",
    "float32", "int8", "bool", "none", "int8", [], [1], [-1], [0, 10**12], [2, "3"], {}, {"a": 1},
]  # fmt: skip


def test_fuzz_header_fields() -> None:
    """Replace header/meta fields with values of random types: only ProtocolError or success."""
    rng = random.Random(99)
    meta = {"dtype": "float32", "shape": [2, 2], "compression": "none", "nbytes": 16, "block_size": None}
    payload = struct.pack(">I", 16) + bytes(16)
    for _ in range(500):
        m = dict(meta)
        h: dict[str, Any] = {"kind": "forward_result", "body": {}, "tensors": [m]}
        for _ in range(rng.randint(1, 3)):
            target = rng.choice(["meta", "meta", "meta", "header", "body"])
            if target == "meta":
                m[rng.choice([*meta, "extra"])] = rng.choice(JSON_VALUES)
            elif target == "header":
                h[rng.choice(["kind", "body", "tensors"])] = rng.choice(JSON_VALUES)
            else:
                h["body"] = {rng.choice(["kind", "step_id", "x"]): rng.choice(JSON_VALUES)}
        raw = json.dumps(h).encode()
        check(MAGIC + struct.pack(">I", len(raw)) + raw + payload)
