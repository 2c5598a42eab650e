"""Record and snapshot builders shared by the pure swarm tests (routing, placement)."""

from __future__ import annotations

from typing import Any

from potluck.swarm.records import ServerRecord, ServerState, SwarmSnapshot


def rec(start: int, end: int, throughput: float = 100.0, **overrides: Any) -> ServerRecord:
    """An online server record for blocks [start, end) with plausible defaults; ``overrides`` set any field."""
    fields: dict[str, Any] = dict(
        state=ServerState.online,
        start=start,
        end=end,
        throughput=throughput,
        inference_rps=100.0,
        forward_rps=1000.0,
        network_rps=0.0,
        cache_tokens_left=100_000,
        max_inference_length=4096,
        dtype="bfloat16",
        version="0.1.0",
    )
    fields.update(overrides)
    return ServerRecord(**fields)


def snap(num_blocks: int, **servers: ServerRecord) -> SwarmSnapshot:
    return SwarmSnapshot.from_records("m", num_blocks, servers, now=0.0)
