"""``potluck bench channel``: what the encrypted direct path costs per hop, against plain TCP, in one process.

Both ends run in this process over loopback TCP, so the difference is the handshake and the per-message
ChaCha20-Poly1305 work (both directions, both sides), without the model or the scheduler in the way.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch

from potluck.swarm.direct import DirectServer, open_direct
from potluck.swarm.signing import IdentityKey
from potluck.wire import InferenceStep, read_message, write_message


async def _echo(peer: str, reader: Any, writer: Any) -> None:
    while True:
        try:
            msg, tensors = await read_message(reader)
        except Exception:
            return
        await write_message(writer, msg, tensors)


async def _round_trips(reader: Any, writer: Any, hidden: torch.Tensor, count: int) -> float:
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        await write_message(writer, InferenceStep(step_id=i + 1, position=i), [hidden])
        await read_message(reader)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[count // 10 :])


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    hidden = torch.randn(
        1, args.tokens, args.hidden
    )  # [B, T, H]: a decode step of the bench model by default
    server_key, client_key = IdentityKey.generate(), IdentityKey.generate()
    secure = DirectServer(server_key, {"echo": _echo})
    secure_port = await secure.start("127.0.0.1", 0)
    plain = await asyncio.start_server(lambda r, w: _echo("plain", r, w), "127.0.0.1", 0)
    plain_port = plain.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
        plain_s = await _round_trips(reader, writer, hidden, args.messages)
        writer.close()
        handshakes = []
        for _ in range(20):
            t0 = time.perf_counter()
            reader, writer = await open_direct(
                f"127.0.0.1:{secure_port}", "echo", server_key.peer_id, timeout=10, identity=client_key
            )
            await _round_trips(reader, writer, hidden, 1)
            handshakes.append(time.perf_counter() - t0)
            writer.close()
        reader, writer = await open_direct(
            f"127.0.0.1:{secure_port}", "echo", server_key.peer_id, timeout=10, identity=client_key
        )
        secure_s = await _round_trips(reader, writer, hidden, args.messages)
        writer.close()
    finally:
        plain.close()
        await secure.close()
    return {
        "bench": "channel",
        "payload_bytes": hidden.numel() * 4,
        "messages": args.messages,
        "plain_round_trip_ms": round(plain_s * 1000, 4),
        "encrypted_round_trip_ms": round(secure_s * 1000, 4),
        "encryption_ms_per_hop": round((secure_s - plain_s) * 1000, 4),
        "connect_handshake_first_step_ms": round(statistics.median(handshakes) * 1000, 3),
    }


def bench_channel(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_run(args))
