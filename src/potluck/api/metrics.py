"""Prometheus metrics of the API process (prometheus-client), exported at ``/metrics`` of the same app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ApiMetrics:
    """One registry per app, so several apps in one process (tests) never clash over metric names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "potluck_api_requests", "HTTP API requests by endpoint and status code", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("potluck_api_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("potluck_api_completion_tokens", "Tokens generated", registry=r)
        self.failovers = Counter(
            "potluck_api_failovers", "Servers replaced mid-request by the client's failover", registry=r
        )
        self.errors = Counter(
            "potluck_api_errors", "Requests that failed, by error type", ["type"], registry=r
        )
        self.cancelled = Counter(
            "potluck_api_cancelled", "Streams whose client hung up before the end", registry=r
        )
        self.first_token_seconds = Histogram(
            "potluck_api_time_to_first_token_seconds", "From request to its first generated token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        self.active = Gauge("potluck_api_active_requests", "Generations running now", registry=r)

    def bind_active(self, read: Callable[[], float]) -> None:
        self.active.set_function(read)

    def bind_speculation(self, stats: Any) -> None:
        """``--draft``: the draft's work so far (a ``SpeculationStats`` every request adds to)."""
        for name, doc, read in (
            ("potluck_api_draft_rounds", "Speculative round trips through the swarm", lambda: stats.rounds),
            ("potluck_api_draft_proposed", "Tokens the draft proposed", lambda: stats.drafted),
            ("potluck_api_draft_accepted", "Proposed tokens the model kept", lambda: stats.accepted),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
