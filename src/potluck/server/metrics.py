"""Prometheus metrics of one server process (prometheus-client), served on ``--metrics-port``.

Handlers only call the small ``count_*`` functions below, so the metric names live in one place and a server
without a metrics port pays one counter increment per step. Gauges of the cache budget and open sessions are
read from the server's state when Prometheus scrapes (``bind_state``), never pushed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# Our own registry (not the process-global default) so the exported page holds only potluck's server metrics.
REGISTRY = CollectorRegistry()

INFERENCE_STEPS = Counter(
    "potluck_server_inference_steps", "Inference steps computed (one per step message)", registry=REGISTRY
)
STEP_BATCH_SIZE = Histogram(
    "potluck_server_step_batch_size",
    "Rows (sequences) per computed inference step",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
BATCH_SESSIONS = Histogram(
    "potluck_server_batch_sessions",
    "Sessions per batched forward the scheduler ran (continuous batching: >1 means steps were shared)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "potluck_server_batch_seconds",
    "Compute time of one scheduler batch on the compute thread (all its sessions' steps together)",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    registry=REGISTRY,
)
BATCH_CPU_SECONDS = Histogram(
    "potluck_server_batch_cpu_seconds",
    "CPU time of the compute thread over one scheduler batch (below the wall time when other processes share "
    "the cores)",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    registry=REGISTRY,
)
TOKENS = Counter(
    "potluck_server_tokens", "batch*tokens run through this server's blocks", ["kind"], registry=REGISTRY
)
REQUESTS = Counter(
    "potluck_server_requests", "Requests by RPC (inference sessions opened, forward, backward)", ["rpc"],
    registry=REGISTRY,
)  # fmt: skip
ERRORS = Counter("potluck_server_errors", "Error replies sent, by error code", ["code"], registry=REGISTRY)
CACHE_TOKENS_USED = Gauge(
    "potluck_server_cache_tokens_used", "KV-cache budget reserved by open sessions (batch*tokens)",
    registry=REGISTRY,
)  # fmt: skip
CACHE_TOKENS_CAPACITY = Gauge(
    "potluck_server_cache_tokens_capacity", "Whole KV-cache budget (batch*tokens)", registry=REGISTRY
)
SESSIONS_OPEN = Gauge("potluck_server_sessions_open", "Inference sessions open now", registry=REGISTRY)


def count_step(batch: int, tokens: int) -> None:
    """One inference step of ``batch`` rows and ``tokens`` new tokens per row was computed."""
    INFERENCE_STEPS.inc()
    STEP_BATCH_SIZE.observe(batch)
    TOKENS.labels("inference").inc(batch * tokens)


def count_batch(sessions: int, seconds: float, cpu_seconds: float) -> None:
    """The scheduler ran one forward shared by ``sessions`` sessions' steps, in ``seconds`` (wall) of compute."""
    BATCH_SESSIONS.observe(sessions)
    BATCH_SECONDS.observe(seconds)
    BATCH_CPU_SECONDS.observe(cpu_seconds)


def count_request(rpc: str, batch_tokens: int = 0) -> None:
    REQUESTS.labels(rpc).inc()
    if batch_tokens:
        TOKENS.labels(rpc).inc(batch_tokens)


def count_error(code: str) -> None:
    ERRORS.labels(code).inc()


def bind_state(
    used: Callable[[], float], capacity: Callable[[], float], sessions: Callable[[], float]
) -> None:
    """Read the cache gauges from the live server state at scrape time (the budget object may be replaced)."""
    CACHE_TOKENS_USED.set_function(used)
    CACHE_TOKENS_CAPACITY.set_function(capacity)
    SESSIONS_OPEN.set_function(sessions)


def start_metrics_server(host: str, port: int) -> tuple[Any, int]:
    """Serve ``/metrics`` in a daemon thread; returns (server, bound port) — port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return server, bound
