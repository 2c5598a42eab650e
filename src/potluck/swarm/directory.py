"""Reading the swarm's records for one model from the DHT into a ``SwarmSnapshot``."""

from __future__ import annotations

from potluck.swarm.records import SwarmSnapshot, block_key
from potluck.swarm.transport import SwarmNode


async def fetch_snapshot(
    node: SwarmNode, model_prefix: str, num_blocks: int, *, timeout: float = 10.0
) -> SwarmSnapshot:
    """Every block's records (unexpired, validated; malformed ones dropped) as one snapshot."""
    keys = [block_key(model_prefix, b) for b in range(num_blocks)]
    found = await node.get_many(keys, timeout=timeout)
    entries = {b: found.get(key, {}) for b, key in enumerate(keys)}
    return SwarmSnapshot.from_block_entries(model_prefix, num_blocks, entries, now=SwarmNode.now())
