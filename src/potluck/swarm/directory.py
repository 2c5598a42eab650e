"""Reading the swarm's records for one model from the DHT into a ``SwarmSnapshot``."""

from __future__ import annotations

import collections

from potluck.swarm.records import (
    MAX_LISTED_MODELS,
    MODELS_KEY,
    ModelRecord,
    SwarmSnapshot,
    block_key,
    is_valid_prefix,
    parse_model_record,
)
from potluck.swarm.transport import SwarmNode


async def fetch_snapshot(
    node: SwarmNode, model_prefix: str, num_blocks: int, *, timeout: float = 10.0
) -> SwarmSnapshot:
    """Every block's records (unexpired, validated; malformed ones dropped) as one snapshot."""
    keys = [block_key(model_prefix, b) for b in range(num_blocks)]
    found = await node.get_many(keys, timeout=timeout)
    entries = {b: found.get(key, {}) for b, key in enumerate(keys)}
    return SwarmSnapshot.from_block_entries(model_prefix, num_blocks, entries, now=SwarmNode.now())


async def fetch_models(node: SwarmNode, *, timeout: float = 10.0) -> dict[str, ModelRecord]:
    """The models servers announce under ``MODELS_KEY``: {model prefix: record}, malformed entries dropped.

    Each server announces its own entry; where servers of one prefix disagree (a hostile one may lie about the
    depth), the description most of them give wins."""
    found = (await node.get_many([MODELS_KEY], timeout=timeout)).get(MODELS_KEY, {})
    return models_from_entries(found)


def models_from_entries(found: dict[str, object]) -> dict[str, ModelRecord]:
    """{model prefix: the record most servers of it announce} from MODELS_KEY's {peer id: value}."""
    votes: dict[str, collections.Counter[ModelRecord]] = collections.defaultdict(collections.Counter)
    for raw in found.values():
        record = parse_model_record(raw)
        if record is not None and is_valid_prefix(record.prefix):
            votes[record.prefix][record] += 1
    models = {prefix: counter.most_common(1)[0][0] for prefix, counter in votes.items()}
    return dict(sorted(models.items())[:MAX_LISTED_MODELS])
