"""A server's lifecycle: join the swarm, choose and load its span, announce it, serve, rebalance, drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import time
from typing import Any

import torch

from potluck.models import BlockSpan, CheckpointError, load_span
from potluck.models.config_view import ConfigView, load_config_view
from potluck.models.cpu_linear import prepack_linears
from potluck.models.fingerprint import checkpoint_fingerprint
from potluck.models.quant import module_bytes
from potluck.server import metrics
from potluck.server.activations import ActivationCache
from potluck.server.cache_budget import CacheBudget
from potluck.server.config import ServerConfig
from potluck.server.handlers import Handlers, ServerState
from potluck.server.placement import block_bytes, choose_quant, size_num_blocks, span_fits
from potluck.server.push import PushHub
from potluck.server.runtime import Runtime, threads_for
from potluck.server.throughput import get_throughput
from potluck.server.tuning import load_adapters
from potluck.swarm import aio
from potluck.swarm.claims import cap_unobserved_claims
from potluck.swarm.direct import DirectServer
from potluck.swarm.directory import fetch_snapshot
from potluck.swarm.limits import raise_file_limit
from potluck.swarm.placement import choose_span_for, should_move
from potluck.swarm.records import (
    MAX_ADAPTER_CHARS,
    MAX_MADDRS,
    MODELS_KEY,
    ModelRecord,
    ServerRecord,
    block_key,
    model_prefix_for,
    record_to_dht,
)
from potluck.swarm.records import ServerState as RecordState
from potluck.swarm.transport import SwarmNode
from potluck.wire import (
    DEFAULT_LIMITS,
    PROTOCOL_BACKWARD,
    PROTOCOL_FORWARD,
    PROTOCOL_INFERENCE,
    PROTOCOL_INFO,
    PROTOCOL_PUSH,
)
from potluck.wire.tensors import InflightBudget

logger = logging.getLogger(__name__)

# A stopping server's offline announcement is a courtesy (its records expire anyway); when the peers that would store
# it are stopping too, hivemind's store can wait out its 10 s timeout, and SIGTERM must not take that long.
OFFLINE_ANNOUNCE_TIMEOUT = 3.0
# For the background loops to end once cancelled; past it, stopping goes on without them.
STOP_STEP_TIMEOUT = 3.0

# TEST ONLY: a server started with this environment variable set to a positive number adds Gaussian noise of that
# standard deviation to every output of its blocks. It exists so tests can run a lying server (see
# tests/swarm/test_verification.py); nothing in potluck sets it, and an honest server never should.
TEST_LIE_ENV = "POTLUCK_TEST_ONLY_LIE_NOISE"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or auto")
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
        self._rng = random.Random()
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.quant = config.quant  # resolved in run() where `auto` needs the model's size
        self.block_bytes = 0  # measured on the loaded span, announced in the records
        self.num_model_blocks = 0
        self.moves = 0
        self._direct_addrs: tuple[str, ...] = ()
        self.fingerprint: str | None = None  # of the checkpoint, announced so clients can detect a mismatch
        # the checkpoint's config, read once at start; every span load (and move) reuses it
        self.model_config: ConfigView | None = None
        self._maddrs: tuple[str, ...] = ()
        self._starting: asyncio.Future[Any] | None = None  # joining or loading: cancelled by a stop request
        self._model_record: dict[str, Any] = {}

    def request_stop(self) -> None:
        self._stop.set()
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()  # Ctrl-C while joining or loading: stop now, not after going online

    # --- main ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        hf_config = self.model_config = load_config_view(cfg.model, revision=cfg.revision, token=cfg.token)
        self.num_model_blocks = int(hf_config.num_hidden_layers)
        wanted = cfg.blocks[1] - cfg.blocks[0] if cfg.blocks is not None else cfg.num_blocks
        self.quant = choose_quant(
            cfg.quant,
            cfg.device,
            fits_unquantized=cfg.quant != "auto"
            or span_fits(hf_config, self.dtype, cfg.device, cfg.cache_tokens, wanted),
        )
        self.block_bytes = block_bytes(hf_config, self.dtype, self.quant)  # estimate until the span is loaded
        if cfg.blocks is not None:
            start, end = cfg.blocks
            if not (0 <= start < end <= self.num_model_blocks):
                raise ValueError(
                    f"--blocks {start}:{end} is outside the model's {self.num_model_blocks} blocks "
                    f"(0:{self.num_model_blocks})"
                )
            length = end - start
        else:
            start = None
            length = cfg.num_blocks or size_num_blocks(
                hf_config, self.dtype, cfg.device, cfg.cache_tokens, self.quant
            )
            length = max(1, min(length, self.num_model_blocks))
        hub_name = (
            None if os.path.isdir(cfg.model) else cfg.model[:MAX_ADAPTER_CHARS]
        )  # local paths stay private
        self._model_record = ModelRecord(
            prefix=self.model_prefix, num_blocks=self.num_model_blocks, name=hub_name
        ).model_dump(exclude_none=True)

        try:
            self.fingerprint = await asyncio.to_thread(
                checkpoint_fingerprint, cfg.model, revision=cfg.revision, token=cfg.token, config=hf_config
            )
        except (
            CheckpointError
        ) as e:  # e.g. a checkpoint without embeddings: serve, but clients cannot compare
            logger.warning("no checkpoint fingerprint (clients cannot check they run the same model): %s", e)
        logger.debug("file limit: %d", raise_file_limit())  # a descriptor per connection: use what we may
        self._starting = asyncio.ensure_future(self._join(cfg))
        try:
            await self._starting
        except asyncio.CancelledError:
            if self._stop.is_set():
                logger.info("stopped before joining the swarm")
                return
            raise
        assert self.node is not None
        runtime = Runtime()
        tasks: list[asyncio.Task[None]] = []
        direct: DirectServer | None = None
        metrics_server: Any = None
        metrics_port: int | None = None
        try:
            self._starting = asyncio.ensure_future(self._choose_and_load(length, start))
            try:
                span = await self._starting
            except asyncio.CancelledError:
                if self._stop.is_set():
                    logger.info("stopped while loading blocks")
                    return
                raise
            self._starting = None
            self.state = ServerState(
                config=cfg,
                model_prefix=self.model_prefix,
                span=span,
                runtime=runtime,
                budget=CacheBudget(cfg.cache_tokens),
                limits=dataclasses.replace(DEFAULT_LIMITS, inflight=InflightBudget(cfg.inflight_frame_bytes)),
                adapters=self._adapters(span),
                activations=ActivationCache(max_bytes=cfg.activation_bytes),
            )
            self.state.push = PushHub(
                self.node,
                model_prefix=self.model_prefix,
                num_blocks=self.num_model_blocks,
                limits=self.state.limits,
                step_timeout=cfg.step_timeout,
                enabled=cfg.push,
            )
            await runtime.run(0, lambda: _warm_up(span, cfg.step_token_budget))
            model_key = f"{cfg.model}@{cfg.revision or 'main'}"
            self._throughput = await runtime.run(
                0,
                lambda: get_throughput(
                    span, model_key=model_key, override=cfg.throughput, bandwidth_mbps=cfg.bandwidth_mbps
                ),
            )
            handlers = Handlers(self.state)
            if cfg.metrics_port is not None:
                state = self.state
                metrics.bind_state(
                    lambda: state.budget.used, lambda: state.budget.capacity, lambda: len(state.sessions)
                )
                metrics_server, metrics_port = metrics.start_metrics_server(cfg.node.host, cfg.metrics_port)
            routes = {
                PROTOCOL_INFO: handlers.info,
                PROTOCOL_INFERENCE: handlers.inference,
                PROTOCOL_FORWARD: handlers.forward,
                PROTOCOL_BACKWARD: handlers.backward,
            }
            if cfg.push:  # without it, a server pushing to us fails at once and reports it: its client relays
                routes[PROTOCOL_PUSH] = handlers.push
            for protocol, handler in routes.items():
                await self.node.add_stream_handler(protocol, handler)
            maddrs = await self.node.visible_maddrs()
            self._maddrs = tuple(maddrs[:MAX_MADDRS])
            if cfg.direct_port is not None:
                direct = DirectServer(
                    self.node.identity,
                    routes,
                    swarm_key=self.node.swarm_key,
                    per_peer=cfg.node.max_streams_per_peer,
                    total=cfg.node.max_streams_total,
                )
                port = await direct.start(cfg.node.host, cfg.direct_port)
                self._direct_addrs = direct_addrs(cfg.node.host, port, maddrs)
                logger.info("direct data path on %s", ", ".join(self._direct_addrs))
            self.state.state = "online"
            await self._announce_current()
            tasks.append(asyncio.create_task(self._announce_loop()))
            tasks.append(asyncio.create_task(self._expire_loop()))
            if cfg.blocks is None and cfg.balance_quality > 0:
                tasks.append(asyncio.create_task(self._balance_loop()))
            logger.info(
                "online: peer %s serving blocks %d:%d of %s (%.1f tokens/s per block)",
                self.node.peer_id, span.start, span.end, self.model_prefix, self._throughput["throughput"],
            )  # fmt: skip
            for maddr in maddrs:
                logger.info("join this swarm with: --initial-peers %s", maddr)
            # A machine-readable line for launchers (demo, bench, tests) that wait for readiness.
            print(
                "POTLUCK_READY "
                + json.dumps(
                    {
                        "peer_id": self.node.peer_id,
                        "start": span.start,
                        "end": span.end,
                        "maddrs": maddrs,
                        "metrics_port": metrics_port,
                        "sockets": self.node.socket_paths(),  # for a launcher that kills us (LocalSwarm)
                    }
                ),
                flush=True,
            )
            await self._stop.wait()
            await self._drain()
        finally:
            if direct is not None:
                await direct.close()
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.shutdown)  # waits for its poll loop (<= 0.5 s)
                metrics_server.server_close()
            for task in tasks:
                task.cancel()
            # Bounded: a loop inside a library call that swallows the cancellation must not hold up SIGTERM.
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=STOP_STEP_TIMEOUT)
                for task in stuck:
                    logger.warning(
                        "stopping: task %s did not finish within %.0f s", task.get_coro(), STOP_STEP_TIMEOUT
                    )
            t0 = time.monotonic()
            runtime.shutdown()
            await self.node.shutdown()
            if time.monotonic() - t0 > STOP_STEP_TIMEOUT:
                logger.warning("stopping: compute thread and swarm node took %.1f s", time.monotonic() - t0)
            logger.info("server stopped")

    # --- span choice, loading, moving ------------------------------------------------------------------

    async def _join(self, cfg: ServerConfig) -> None:
        self.node = await SwarmNode.create(cfg.node)
        if not cfg.node.initial_peers:
            logger.info("started a new swarm (no initial peers): this server is its first peer")

    async def _choose_and_load(self, length: int, start: int | None) -> BlockSpan:
        if start is None:
            start = await self._choose_start(length)
        return await self._load(start, start + length)

    async def _choose_start(self, length: int) -> int:
        """Wait a random moment (servers started together then see each other), then take the weakest window."""
        assert self.node is not None
        delay = self._rng.uniform(0, self.config.start_delay_max)
        logger.info("choosing %d blocks after a %.1fs random delay", length, delay)
        await asyncio.sleep(delay)
        snapshot = cap_unobserved_claims(
            await fetch_snapshot(self.node, self.model_prefix, self.num_model_blocks)
        )
        start = choose_span_for(snapshot, 1.0, length, exclude_peer=self.node.peer_id)
        logger.info(
            "chose blocks %d:%d (per-block throughput %s)",
            start,
            start + length,
            snapshot.block_throughputs(),
        )
        return start

    async def _load(self, start: int, end: int) -> BlockSpan:
        cfg = self.config
        await self._announce("joining", start, end, cache_left=cfg.cache_tokens)
        logger.info(
            "loading blocks %d:%d of %s (%s, %s, quant %s)",
            start,
            end,
            cfg.model,
            self.dtype,
            cfg.device,
            self.quant,
        )
        span = await asyncio.to_thread(
            load_span,
            cfg.model,
            start,
            end,
            dtype=self.dtype,
            device=cfg.device,
            revision=cfg.revision,
            token=cfg.token,
            config=self.model_config,
            progress=True,
            quant=self.quant,
        )
        span.requires_grad_(False)
        if cfg.prepack:
            packed = prepack_linears(span)  # fp32 on CPU only; a no-op elsewhere
            if packed:
                logger.info("prepacked %d linear layers for oneDNN", packed)
        self.block_bytes = module_bytes(span) // span.num_blocks
        noise = float(os.environ.get(TEST_LIE_ENV, "0") or 0)
        if noise > 0:  # TEST ONLY: a dishonest server, so tests can show the client's verification catches it
            logger.warning("%s=%g: this server adds noise to its outputs (test only)", TEST_LIE_ENV, noise)
            _add_output_noise(span, noise)
        return span

    def _adapters(self, span: BlockSpan) -> dict:  # type: ignore[type-arg]
        cfg = self.config
        return load_adapters(
            cfg.adapters, span.spec, span.start, span.end, dtype=self.dtype, device=cfg.device
        )

    async def _balance_loop(self) -> None:
        """Every ~period (randomised so servers do not move in lockstep), move if the swarm would gain enough."""
        assert self.node is not None and self.state is not None
        period = self.config.balance_check_period
        while True:
            await asyncio.sleep(self._rng.uniform(0.5 * period, 1.5 * period))
            try:
                snapshot = await fetch_snapshot(self.node, self.model_prefix, self.num_model_blocks)
                # records are signed (no forgeries), but claims are not proofs: cap them at the swarm's median
                snapshot = cap_unobserved_claims(snapshot, trusted=(self.node.peer_id,))
                if self.node.peer_id not in snapshot.servers:
                    continue  # our own records are not visible yet
                new_start = should_move(
                    snapshot, self.node.peer_id, balance_quality=self.config.balance_quality, rng=self._rng
                )
            except Exception as e:  # a flaky DHT read must not stop balancing
                logger.warning("balance check failed: %s", e)
                continue
            if new_start is not None and new_start != self.state.span.start:
                await self._move(new_start)

    async def _move(self, new_start: int) -> None:
        """Announce offline, drain, load the new span, announce online. Clients of the old span fail over."""
        assert self.state is not None
        s = self.state
        old = (s.span.start, s.span.end)
        length = old[1] - old[0]
        logger.info("rebalancing: moving from blocks %d:%d to %d:%d", *old, new_start, new_start + length)
        s.state = "offline"
        # the old span's sessions end now: their caches and budget are freed before the new span loads
        s.close_sessions("wrong_span", "this server moved to other blocks: continue elsewhere")
        await self._announce_current()
        if s.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.drain_timeout):
                    await s.idle.wait()
        s.generation += 1  # sessions on the old span are refused from now on
        await s.runtime.run(0, s.activations.clear)
        span = await self._load(new_start, new_start + length)
        await s.runtime.run(0, lambda: _warm_up(span, s.config.step_token_budget))
        s.span, s.adapters = span, self._adapters(span)
        s.state = "online"
        self.moves += 1
        await self._announce_current()
        logger.info("now serving blocks %d:%d", span.start, span.end)

    async def _drain(self) -> None:
        """Announce offline, refuse new sessions and steps, let in-flight computation finish."""
        assert self.state is not None
        logger.info("draining: announcing offline, waiting for %d in-flight steps", self.state.in_flight)
        self.state.state = "offline"
        with contextlib.suppress(Exception):  # best effort, and bounded: the peers may be stopping too
            async with asyncio.timeout(OFFLINE_ANNOUNCE_TIMEOUT):
                await self._announce_current()
        if self.state.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.drain_timeout):
                    await self.state.idle.wait()
        self.state.close_sessions("draining", "server is draining: continue on another server")

    async def _expire_loop(self) -> None:
        """Free expired training activations eagerly, so an idle server does not sit on them until the next put."""
        assert self.state is not None
        while True:
            await asyncio.sleep(max(1.0, self.state.activations.ttl / 8))
            await self.state.runtime.run(0, self.state.activations.expire)

    # --- announcements -----------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            if self.state is not None and self.state.push is not None and self.config.push:
                try:  # RTTs to the servers after our span, for the next announcement (and clients' routing)
                    await self.state.push.probe_next(self.state.span.start, self.state.span.end)
                except Exception as e:
                    logger.debug("RTT probes failed: %s", e)
            try:
                await self._announce_current()
            except Exception as e:  # a flaky DHT must not kill the server; the next period retries
                logger.warning("announce failed: %s", e)

    async def _announce_current(self) -> None:
        assert self.state is not None
        s = self.state
        await self._announce(s.state, s.span.start, s.span.end, cache_left=s.budget.left)

    async def _announce(self, state: str, start: int, end: int, *, cache_left: int) -> None:
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
            cache_tokens_left=max(0, cache_left),
            max_inference_length=self.config.max_inference_length,
            max_batch_tokens=self.config.max_batch_tokens,
            fingerprint=self.fingerprint,
            dtype=str(self.dtype).removeprefix("torch."),
            version=_version(),
            public_name=self.config.public_name,
            adapters=tuple(self.state.adapters) if self.state is not None else (),
            quant=self.quant,
            block_bytes=self.block_bytes,
            direct_addrs=self._direct_addrs,
            maddrs=self._maddrs,
            announced_at=SwarmNode.now(),
            next_pings=self.state.push.rtts.best() if self.state is not None and self.state.push else {},
        )
        value = record_to_dht(record)
        # An offline record lives briefly: enough for clients and placement to notice, then it expires.
        ttl = self.config.expiration if state != "offline" else min(self.config.expiration, 30.0)
        items = [(block_key(self.model_prefix, b), self.node.peer_id, value) for b in range(start, end)]
        if state != "offline":  # so that `potluck status` without a model can list what the swarm serves
            items.append((MODELS_KEY, self.node.peer_id, self._model_record))
        ok = await self.node.store_many(items, expiration_time=SwarmNode.now() + ttl)
        if not ok:
            logger.debug("some DHT records of blocks %d:%d were not stored on every replica", start, end)


def direct_addrs(host: str, port: int, maddrs: list[str]) -> tuple[str, ...]:
    """Where clients can reach the direct path: the listen host, or the daemon's visible IPv4s for 0.0.0.0."""
    if host not in ("0.0.0.0", ""):
        return (f"{host}:{port}",)
    ips = []
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] not in ips and parts[2] != "0.0.0.0":
            ips.append(parts[2])
    return tuple(f"{ip}:{port}" for ip in ips[:4])


def _warm_up(span: BlockSpan, prefill_tokens: int) -> None:
    """On the compute thread, before the first client: touch every weight page, start the thread pool, and run a
    full prefill chunk (``prefill_tokens``: the step budget, the largest piece the scheduler runs at once), a
    decode step and a packed batch of two decode steps, so one-time allocations and the allocator's growth to
    prefill-sized buffers are not charged to a user's first request (measured: 320 ms instead of 170 ms for the
    first 128-token prefill through 4 blocks of the bench model, with a 64-token warm-up)."""
    param = next(p for p in span.parameters() if p.is_floating_point())  # not a quantized weight
    hidden = int(span.spec.hidden_size)
    with torch.inference_mode():
        for tokens in (max(1, prefill_tokens), 1):
            torch.set_num_threads(threads_for(tokens))
            cache = span.new_cache(1, tokens + 1)
            span(torch.zeros(1, tokens, hidden, dtype=param.dtype, device=param.device), cache=cache)
        caches = [span.new_cache(1, 2) for _ in range(2)]
        span.forward_packed(
            [(torch.zeros(1, 1, hidden, dtype=param.dtype, device=param.device), c) for c in caches]
        )


def _add_output_noise(span: BlockSpan, std: float) -> None:
    """TEST ONLY (see ``TEST_LIE_ENV``): every span (and sub-span) this server runs returns output + N(0, std)."""
    original_slice = span.slice

    def noisy(module: BlockSpan) -> BlockSpan:
        module.register_forward_hook(lambda _module, _args, out: out + std * torch.randn_like(out))
        return module

    span.slice = lambda start, end: noisy(original_slice(start, end))  # type: ignore[method-assign]
    noisy(span)


def _version() -> str:
    from potluck import __version__

    return __version__


def run_server(config: ServerConfig) -> int:
    """Blocking entry point for ``potluck serve``; errors propagate (the command line reports them in one line)."""
    aio.run(Server(config).run())
    return 0
