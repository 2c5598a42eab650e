"""A server's lifecycle: join the swarm, load its span, announce it, serve, and drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time

import torch

from potluck.models import load_config, load_span
from potluck.server.cache_budget import CacheBudget
from potluck.server.config import ServerConfig
from potluck.server.handlers import (
    PROTOCOL_BACKWARD,
    PROTOCOL_FORWARD,
    PROTOCOL_INFERENCE,
    PROTOCOL_INFO,
    Handlers,
    ServerState,
)
from potluck.server.runtime import Runtime
from potluck.server.throughput import measure_throughput
from potluck.server.tuning import load_adapters
from potluck.swarm import aio
from potluck.swarm.records import ServerRecord, block_key, model_prefix_for, record_to_dht
from potluck.swarm.records import ServerState as RecordState
from potluck.swarm.transport import SwarmNode
from potluck.wire import DEFAULT_LIMITS

logger = logging.getLogger(__name__)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or auto") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating type")
    return dtype


class Server:
    """Run with ``await Server(config).run()``; stops on SIGTERM/SIGINT or ``request_stop()``."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_prefix = config.model_prefix or model_prefix_for(config.model)
        self._stop = asyncio.Event()
        self.node: SwarmNode | None = None
        self.state: ServerState | None = None
        self._throughput: dict[str, float] = {}

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        hf_config = load_config(cfg.model, revision=cfg.revision, token=cfg.token)
        num_layers = int(hf_config.num_hidden_layers)
        if cfg.blocks is None:
            raise ValueError(
                "choose the span with --blocks A:B (automatic placement comes with load balancing)"
            )
        start, end = cfg.blocks
        if not (0 <= start < end <= num_layers):
            raise ValueError(
                f"--blocks {start}:{end} is outside the model's {num_layers} blocks (0:{num_layers})"
            )
        dtype = resolve_dtype(cfg.dtype, cfg.device)

        self.node = await SwarmNode.create(cfg.node)
        runtime: Runtime | None = None
        announcer: asyncio.Task[None] | None = None
        try:
            self._joining_span = (start, end)
            await self._announce("joining", start, end, cache_left=cfg.cache_tokens, dtype=dtype)
            logger.info("loading blocks %d:%d of %s (%s, %s)", start, end, cfg.model, dtype, cfg.device)
            span = await asyncio.to_thread(
                load_span,
                cfg.model,
                start,
                end,
                dtype=dtype,
                device=cfg.device,
                revision=cfg.revision,
                token=cfg.token,
            )
            span.requires_grad_(False)
            adapters = load_adapters(cfg.adapters, span.spec, start, end, dtype=dtype, device=cfg.device)
            runtime = Runtime()
            self.state = ServerState(
                config=cfg,
                model_prefix=self.model_prefix,
                span=span,
                runtime=runtime,
                budget=CacheBudget(cfg.cache_tokens),
                limits=DEFAULT_LIMITS,
                adapters=adapters,
            )
            self._throughput = await runtime.run(0, lambda: measure_throughput(span, cfg.throughput))
            handlers = Handlers(self.state)
            await self.node.add_stream_handler(PROTOCOL_INFO, handlers.info)
            await self.node.add_stream_handler(PROTOCOL_INFERENCE, handlers.inference)
            await self.node.add_stream_handler(PROTOCOL_FORWARD, handlers.forward)
            await self.node.add_stream_handler(PROTOCOL_BACKWARD, handlers.backward)
            self.state.state = "online"
            await self._announce_current()
            announcer = asyncio.create_task(self._announce_loop())
            maddrs = await self.node.visible_maddrs()
            logger.info(
                "online: peer %s serving blocks %d:%d of %s (%.1f tokens/s per block)",
                self.node.peer_id, start, end, self.model_prefix, self._throughput["throughput"],
            )  # fmt: skip
            # A machine-readable line for launchers (demo, bench, tests) that wait for readiness.
            print(
                "POTLUCK_READY "
                + json.dumps({"peer_id": self.node.peer_id, "start": start, "end": end, "maddrs": maddrs}),
                flush=True,
            )
            await self._stop.wait()
            await self._drain()
        finally:
            if announcer is not None:
                announcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcer
            if runtime is not None:
                runtime.shutdown()
            await self.node.shutdown()
            logger.info("server stopped")

    async def _drain(self) -> None:
        """Announce offline, refuse new sessions and steps, let in-flight computation finish."""
        assert self.state is not None
        logger.info("draining: announcing offline, waiting for %d in-flight steps", self.state.in_flight)
        self.state.state = "offline"
        with contextlib.suppress(Exception):
            await self._announce_current()
        if self.state.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.state.idle.wait(), timeout=self.config.drain_timeout)

    # --- announcements -----------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await self._announce_current()
            except Exception as e:  # a flaky DHT must not kill the server; the next period retries
                logger.warning("announce failed: %s", e)

    async def _announce_current(self) -> None:
        assert self.state is not None
        s = self.state
        await self._announce(s.state, s.span.start, s.span.end, cache_left=s.budget.left, dtype=s.dtype)

    async def _announce(
        self, state: str, start: int, end: int, *, cache_left: int, dtype: torch.dtype
    ) -> None:
        assert self.node is not None
        tp = self._throughput
        record = ServerRecord(
            state=RecordState(state),
            start=start,
            end=end,
            throughput=tp.get("throughput", 0.0),
            inference_rps=tp.get("inference_rps", 0.0),
            forward_rps=tp.get("forward_rps", 0.0),
            network_rps=tp.get("network_rps", 0.0),
            cache_tokens_left=cache_left,
            max_inference_length=self.config.max_inference_length,
            dtype=str(dtype).removeprefix("torch."),
            version=_version(),
            public_name=self.config.public_name,
            adapters=tuple(self.state.adapters) if self.state is not None else (),
        )
        value = record_to_dht(record)
        # An offline record lives briefly: enough for clients to notice, then the keys clean themselves up.
        ttl = self.config.expiration if state != "offline" else min(self.config.expiration, 30.0)
        ok = await self.node.store_many(
            [(block_key(self.model_prefix, b), self.node.peer_id, value) for b in range(start, end)],
            expiration_time=SwarmNode.now() + ttl,
        )
        if not ok:
            logger.warning("some DHT records of blocks %d:%d were not stored", start, end)


def _version() -> str:
    from potluck import __version__

    return __version__


def run_server(config: ServerConfig) -> int:
    """Blocking entry point for ``potluck serve``."""
    t0 = time.monotonic()
    try:
        aio.run(Server(config).run())
    except KeyboardInterrupt:
        pass
    except Exception as e:
        logger.error("server failed: %s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger.debug("server ran %.1fs", time.monotonic() - t0)
    return 0
