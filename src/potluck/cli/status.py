"""``potluck status``: each block's servers and the blocks nobody holds, read from the DHT."""

from __future__ import annotations

from typing import Any

from potluck.models import load_config
from potluck.swarm import aio
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.records import SwarmSnapshot, model_prefix_for
from potluck.swarm.routing import format_block_ranges
from potluck.swarm.transport import NodeOptions, SwarmNode


async def read_snapshot(
    initial_peers: tuple[str, ...], model_prefix: str, num_blocks: int, host: str | None = None
) -> SwarmSnapshot:
    node = await SwarmNode.create(
        NodeOptions(initial_peers=initial_peers, host=host or "127.0.0.1", client_mode=True)
    )
    try:
        return await fetch_snapshot(node, model_prefix, num_blocks)
    finally:
        await node.shutdown()


def snapshot_report(snapshot: SwarmSnapshot) -> dict[str, Any]:
    blocks = []
    for b in range(snapshot.num_blocks):
        servers = []
        for span in sorted(snapshot.servers.values(), key=lambda s: s.peer_id):
            if not span.start <= b < span.end:
                continue
            r = span.record
            servers.append(
                {
                    "peer_id": span.peer_id,
                    "name": r.public_name,
                    "state": r.state.value,
                    "span": [r.start, r.end],
                    "throughput": round(r.throughput, 2),
                    "inference_rps": round(r.inference_rps, 2),
                    "cache_tokens_left": r.cache_tokens_left,
                    "dtype": r.dtype,
                    "quant": r.quant,
                    "block_bytes": r.block_bytes,
                    "version": r.version,
                }
            )
        blocks.append({"index": b, "servers": servers})
    return {
        "model": snapshot.model_prefix,
        "num_blocks": snapshot.num_blocks,
        "blocks": blocks,
        "missing_blocks": snapshot.missing_blocks(),
        "servers": len(snapshot.servers),
    }


def gather_status(
    model: str, initial_peers: tuple[str, ...], model_prefix: str | None = None, host: str | None = None
) -> dict[str, Any]:
    num_blocks = int(load_config(model).num_hidden_layers)
    prefix = model_prefix or model_prefix_for(model)
    return snapshot_report(aio.run(read_snapshot(initial_peers, prefix, num_blocks, host)))


def render_status(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}: {report['num_blocks']} blocks, {report['servers']} servers"]
    seen: dict[str, dict[str, Any]] = {}
    for block in report["blocks"]:
        for s in block["servers"]:
            seen.setdefault(s["peer_id"], s)
    lines.append(
        f"{'peer':<14} {'name':<14} {'span':<9} {'state':<8} {'tok/s/blk':>10} {'cache left':>10} "
        f"{'quant':<6} {'MiB/blk':>8}"
    )
    for peer, s in sorted(seen.items(), key=lambda kv: (kv[1]["span"], kv[0])):
        span = f"{s['span'][0]}:{s['span'][1]}"
        lines.append(
            f"…{peer[-12:]:<13} {str(s['name'] or '-'):<14} {span:<9} {s['state']:<8} "
            f"{s['throughput']:>10.1f} {s['cache_tokens_left']:>10} "
            f"{s.get('quant', 'none'):<6} {s.get('block_bytes', 0) / 2**20:>8.1f}"
        )
    missing = report["missing_blocks"]
    lines.append(f"missing blocks: {format_block_ranges(missing)}" if missing else "all blocks are covered")
    return "\n".join(lines)
