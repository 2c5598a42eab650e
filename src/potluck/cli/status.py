"""``potluck status``: the models a swarm serves, or one model's servers and the blocks nobody holds.

Records in the DHT outlive a killed server until they expire, so each announced server is also asked for its
info over a stream: one that does not answer within ``probe_timeout`` is shown as dead and does not count as
serving. Offline (draining, moving) servers are listed but do not count either.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from potluck.cli.errors import CommandError
from potluck.swarm import aio
from potluck.swarm.directory import fetch_models, fetch_snapshot
from potluck.swarm.records import ModelRecord, ServerState, SwarmSnapshot, model_prefix_for
from potluck.swarm.routing import format_block_ranges
from potluck.swarm.transport import NodeOptions, SwarmNode

logger = logging.getLogger(__name__)

DEAD = "dead"  # announced, but did not answer the probe


def plural(n: int, word: str) -> str:
    """1 server, 2 servers, 0 servers."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def probe(node: SwarmNode, peer_id: str, timeout: float) -> bool:
    """True if the server answers an info request within ``timeout`` seconds."""
    from potluck.wire import PROTOCOL_INFO, InfoRequest, InfoResponse
    from potluck.wire.framing import read_message, write_message

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await node.open_stream(peer_id, PROTOCOL_INFO, timeout=timeout)
            try:
                await write_message(writer, InfoRequest())
                reply, _ = await read_message(reader)
            finally:
                writer.close()
        return isinstance(reply, InfoResponse)
    except Exception as e:  # refused, reset, timed out: it does not serve
        logger.debug("server %s did not answer: %s", peer_id, e)
        return False


def _client_node(initial_peers: tuple[str, ...], host: str | None, swarm_key: str | None) -> NodeOptions:
    return NodeOptions(
        initial_peers=initial_peers, host=host or "127.0.0.1", client_mode=True, swarm_key_path=swarm_key
    )


async def read_status(
    initial_peers: tuple[str, ...],
    model_prefix: str,
    num_blocks: int | None,
    host: str | None = None,
    probe_timeout: float = 3.0,
    swarm_key: str | None = None,
) -> tuple[SwarmSnapshot, dict[str, bool]]:
    """The model's snapshot and, per announced server, whether it answered. ``num_blocks`` None: as the swarm's
    servers announced it under the models key."""
    node = await SwarmNode.create(_client_node(initial_peers, host, swarm_key))
    try:
        if num_blocks is None:
            models = await fetch_models(node)
            if model_prefix not in models:
                served = ", ".join(models) or "none"
                raise CommandError(
                    f"no server in this swarm announces a model named {model_prefix} (it serves: {served}); "
                    "pass the checkpoint directory or hub id, or --model-prefix if its servers use another name"
                )
            num_blocks = models[model_prefix].num_blocks
        snapshot = await fetch_snapshot(node, model_prefix, num_blocks)
        peers = list(snapshot.servers)
        answers = await asyncio.gather(*(probe(node, p, probe_timeout) for p in peers))
        return snapshot, dict(zip(peers, answers, strict=True))
    finally:
        await node.shutdown()


def snapshot_report(snapshot: SwarmSnapshot, alive: dict[str, bool] | None = None) -> dict[str, Any]:
    """JSON-able status of one model; without ``alive`` (no probes) every announced server counts as alive."""
    servers: list[dict[str, Any]] = []
    serving: set[str] = set()
    for span in snapshot.servers.values():  # sorted by peer id
        r = span.record
        answered = True if alive is None else alive.get(span.peer_id, False)
        status = r.state.value if answered else DEAD
        if status == ServerState.online.value:
            serving.add(span.peer_id)
        servers.append(
            {
                "peer_id": span.peer_id,
                "name": r.public_name,
                "state": r.state.value,  # as announced
                "status": status,  # as seen now: online | joining | offline | dead
                "span": [r.start, r.end],
                "throughput": round(r.throughput, 2),
                "inference_rps": round(r.inference_rps, 2),
                "cache_tokens_left": r.cache_tokens_left,
                "max_inference_length": r.max_inference_length,
                "dtype": r.dtype,
                "quant": r.quant,
                "block_bytes": r.block_bytes,
                "version": r.version,
                "adapters": list(r.adapters),
                "maddrs": list(r.maddrs),
                "direct_addrs": list(r.direct_addrs),
            }
        )
    blocks = [
        {"index": b, "servers": [s for s in servers if s["span"][0] <= b < s["span"][1]]}
        for b in range(snapshot.num_blocks)
    ]
    covered = {b for s in servers if s["peer_id"] in serving for b in range(s["span"][0], s["span"][1])}
    missing = [b for b in range(snapshot.num_blocks) if b not in covered]
    return {
        "model": snapshot.model_prefix,
        "num_blocks": snapshot.num_blocks,
        "servers": servers,
        "serving": len(serving),
        "blocks": blocks,
        "missing_blocks": missing,
    }


def gather_status(
    model: str | None,
    initial_peers: tuple[str, ...],
    model_prefix: str | None = None,
    host: str | None = None,
    *,
    probe_timeout: float = 3.0,
    swarm_key: str | None = None,
) -> dict[str, Any]:
    """Status of one model. A checkpoint directory gives the depth; otherwise the swarm's own announcement does
    (no hub download just to count blocks)."""
    from potluck.cli.checks import check_model, looks_like_local_path

    num_blocks: int | None = None
    if model is not None and (os.path.isdir(os.path.expanduser(model)) or looks_like_local_path(model)):
        from potluck.models.config_view import load_config_view

        path = check_model(model)
        num_blocks = int(load_config_view(path).num_hidden_layers)
    prefix = model_prefix or model_prefix_for(model or "")
    snapshot, alive = aio.run(read_status(initial_peers, prefix, num_blocks, host, probe_timeout, swarm_key))
    return snapshot_report(snapshot, alive)


def gather_models(
    initial_peers: tuple[str, ...],
    host: str | None = None,
    *,
    probe_timeout: float = 3.0,
    swarm_key: str | None = None,
) -> dict[str, Any]:
    """Every model the swarm's servers announce, each with its servers counted as in ``snapshot_report``."""

    async def read() -> dict[str, Any]:
        node = await SwarmNode.create(_client_node(initial_peers, host, swarm_key))
        try:
            models: dict[str, ModelRecord] = await fetch_models(node)
            out = []
            for prefix, record in models.items():
                snapshot = await fetch_snapshot(node, prefix, record.num_blocks)
                peers = list(snapshot.servers)
                answers = await asyncio.gather(*(probe(node, p, probe_timeout) for p in peers))
                report = snapshot_report(snapshot, dict(zip(peers, answers, strict=True)))
                out.append(
                    {
                        "model": prefix,
                        "name": record.name,
                        "num_blocks": record.num_blocks,
                        "servers": len(report["servers"]),
                        "serving": report["serving"],
                        "missing_blocks": report["missing_blocks"],
                    }
                )
            return {"models": out}
        finally:
            await node.shutdown()

    return aio.run(read())


def render_models(report: dict[str, Any]) -> str:
    models = report["models"]
    if not models:
        return "this swarm serves no models (no server has announced one)"
    lines = [f"this swarm serves {plural(len(models), 'model')}:"]
    for m in models:
        name = f" ({m['name']})" if m.get("name") else ""
        missing = m["missing_blocks"]
        coverage = f"missing blocks {format_block_ranges(missing)}" if missing else "all blocks covered"
        lines.append(
            f"  {m['model']}{name}: {plural(m['num_blocks'], 'block')}, "
            f"{plural(m['serving'], 'server')} online, {coverage}"
        )
    lines.append("details: potluck status MODEL --initial-peers ...")
    return "\n".join(lines)


def render_status(report: dict[str, Any]) -> str:
    servers = report["servers"]
    others = {
        status: sum(1 for s in servers if s["status"] == status) for status in ("joining", "offline", DEAD)
    }
    extra = ", ".join(f"{n} {status}" for status, n in others.items() if n)
    lines = [
        f"model {report['model']}: {plural(report['num_blocks'], 'block')}, "
        f"{plural(report['serving'], 'server')} online" + (f" ({extra})" if extra else "")
    ]
    if servers:
        lines.append(
            f"{'peer':<14} {'name':<14} {'span':<9} {'status':<8} {'tok/s/blk':>10} {'cache left':>10} "
            f"{'quant':<6} {'MiB/blk':>8} {'version':<8} adapters / addresses"
        )
    for s in sorted(servers, key=lambda s: (s["span"], s["peer_id"])):
        span = f"{s['span'][0]}:{s['span'][1]}"
        adapters = ",".join(s["adapters"]) or "-"
        addrs = " ".join(s["maddrs"] + s["direct_addrs"]) or "-"
        lines.append(
            f"…{s['peer_id'][-12:]:<13} {str(s['name'] or '-'):<14} {span:<9} {s['status']:<8} "
            f"{s['throughput']:>10.1f} {s['cache_tokens_left']:>10} {s['quant']:<6} "
            f"{s['block_bytes'] / 2**20:>8.1f} {s['version']:<8} {adapters} {addrs}"
        )
    missing = report["missing_blocks"]
    lines.append(f"missing blocks: {format_block_ranges(missing)}" if missing else "all blocks are covered")
    return "\n".join(lines)
