"""The dashboard's view of the swarm: DHT records read every few seconds, served as JSON at ``/api/v1/swarm``.

It reads what servers announce (``swarm/records.py``) through any client node: the API's own model client, or a
node of its own for ``potluck dashboard``. Without a model name it lists every model the servers announce under
``MODELS_KEY``, so it works for private swarms nobody registered anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from potluck.client.loop import LoopThread
from potluck.swarm.directory import fetch_models, fetch_snapshot
from potluck.swarm.records import SwarmSnapshot
from potluck.swarm.transport import SwarmNode

logger = logging.getLogger(__name__)


def server_report(snapshot: SwarmSnapshot, now: float) -> list[dict[str, Any]]:
    """One row per server of the snapshot, with everything its records announce that a person wants to see."""
    rows = []
    for span in sorted(snapshot.servers.values(), key=lambda s: (s.start, s.end, s.peer_id)):
        r = span.record
        rows.append(
            {
                "peer_id": span.peer_id,
                "name": r.public_name,
                "state": r.state.value,
                "start": r.start,
                "end": r.end,
                "throughput": round(r.throughput, 2),
                "inference_rps": round(r.inference_rps, 2),
                "cache_tokens_left": r.cache_tokens_left,
                "max_inference_length": r.max_inference_length,
                "dtype": r.dtype,
                # announced by servers that quantize their weights; older records have no such field
                "quantization": getattr(r, "quantization", None),
                "adapters": list(r.adapters),
                "version": r.version,
                "announced_at": r.announced_at or None,
                "announced_ago_s": round(max(0.0, now - r.announced_at), 1) if r.announced_at else None,
            }
        )
    return rows


def model_report(snapshot: SwarmSnapshot, now: float) -> dict[str, Any]:
    return {
        "model": snapshot.model_prefix,
        "num_blocks": snapshot.num_blocks,
        "missing_blocks": snapshot.missing_blocks(),
        "servers": server_report(snapshot, now),
    }


class SwarmWatch:
    """Keeps the latest swarm report; ``refresh`` runs on the node's loop, ``report`` from anywhere."""

    def __init__(
        self,
        node: SwarmNode,
        loop: LoopThread,
        *,
        models: dict[str, int] | None = None,
        period: float = 2.0,
        owns_node: bool = False,
    ):
        self.node = node
        self.loop = loop
        self.fixed_models = dict(models or {})  # prefix -> num_blocks; empty: discover from MODELS_KEY
        self.period = period
        self.owns_node = owns_node
        self._report: dict[str, Any] = {"updated_at": None, "models": []}
        self._task: asyncio.Task[None] | None = None

    def report(self) -> dict[str, Any]:
        return self._report

    async def _read(self) -> dict[str, Any]:
        """On the node's loop: the models to show, then each model's snapshot."""
        models = dict(self.fixed_models)
        if not models:
            models = {prefix: r.num_blocks for prefix, r in (await fetch_models(self.node)).items()}
        now = SwarmNode.now()
        reports = []
        for prefix, num_blocks in models.items():
            snapshot = await fetch_snapshot(self.node, prefix, num_blocks)
            reports.append(model_report(snapshot, now))
        return {"updated_at": now, "models": reports}

    async def refresh(self) -> dict[str, Any]:
        """From any event loop: read the swarm on the node's loop and keep the result."""
        future = asyncio.run_coroutine_threadsafe(self._read(), self.loop.loop)
        self._report = await asyncio.wrap_future(future)
        return self._report

    async def _refresh_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh()
            except Exception as e:  # a flaky DHT read must not stop the dashboard: show the last report
                logger.warning("swarm refresh failed: %s", e)
            await asyncio.sleep(max(0.1, self.period - (time.monotonic() - started)))

    def start(self) -> None:
        """Start refreshing in the background of the calling (ASGI) loop."""
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.owns_node:
            future = asyncio.run_coroutine_threadsafe(self.node.shutdown(), self.loop.loop)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(15):
                    await asyncio.wrap_future(future)
