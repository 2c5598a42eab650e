"""A quick measurement of what this server contributes, announced in its DHT records.

Rates are per block: a server holding n blocks that does one decode step of its whole span in t seconds
has ``inference_rps = n / t``; routing divides by the hop length again to price a hop.
"""

from __future__ import annotations

import time

import torch

from potluck.models import BlockSpan

DEFAULT_NETWORK_RPS = 1e5  # tokens/s of hidden states our link is assumed to carry until measured


def measure_throughput(span: BlockSpan, override: float | None = None, *, steps: int = 4) -> dict[str, float]:
    """Time a few one-token decode steps and one short forward pass of ``span``."""
    n = span.end - span.start
    param = next(span.parameters())
    hidden = int(span.spec.hidden_size)
    with torch.inference_mode():
        cache = span.new_cache(1, steps + 2)
        x = torch.randn(1, 1, hidden, dtype=param.dtype, device=param.device)  # [1, 1, H]
        span(x, cache=cache)  # warm-up (allocations, kernels)
        t0 = time.perf_counter()
        for _ in range(steps):
            span(x, cache=cache)
        _sync(param.device)
        step_s = (time.perf_counter() - t0) / steps
        tokens = 64
        xs = torch.randn(1, tokens, hidden, dtype=param.dtype, device=param.device)  # [1, T, H]
        t0 = time.perf_counter()
        span(xs)
        _sync(param.device)
        forward_s = time.perf_counter() - t0
    inference_rps = n / max(step_s, 1e-9)
    forward_rps = n * tokens / max(forward_s, 1e-9)
    throughput = override if override is not None else min(inference_rps, DEFAULT_NETWORK_RPS)
    return {
        "throughput": float(throughput),
        "inference_rps": float(inference_rps),
        "forward_rps": float(forward_rps),
        "network_rps": float(DEFAULT_NETWORK_RPS),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
