"""What this server contributes, measured once per (model, device, dtype) and cached on disk.

Rates are per block, so they do not depend on how many blocks the server holds: ``inference_rps`` is one-token
decode steps per second through one block, ``forward_rps`` tokens per second through one block in a batch.
``network_rps`` is how many hidden-state tokens per second the link carries (from ``--bandwidth-mbps``; there is
no speed test to a third party). The announced ``throughput`` (used for load balancing) is the smaller of
``forward_rps`` and ``network_rps``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from potluck.models import BlockSpan
from potluck.paths import cache_root, write_json_atomically

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_BANDWIDTH_MBPS = 100.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{os.cpu_count()}cores"


def measure_compute(span: BlockSpan, *, steps: int = 4, tokens: int = 64) -> dict[str, float]:
    """Time a few one-token decode steps and one short forward of ``span``; rates per block."""
    n = span.end - span.start
    param = next(p for p in span.parameters() if p.is_floating_point())  # not a quantized weight
    hidden = int(span.spec.hidden_size)
    with torch.inference_mode():
        cache = span.new_cache(1, steps + 2)
        x = torch.randn(1, 1, hidden, dtype=param.dtype, device=param.device)  # [1, 1, H]
        span(x, cache=cache)  # warm-up (allocations, kernels)
        _sync(param.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            span(x, cache=cache)
        _sync(param.device)
        step_s = (time.perf_counter() - t0) / steps
        xs = torch.randn(1, tokens, hidden, dtype=param.dtype, device=param.device)  # [1, T, H]
        span(xs)
        _sync(param.device)
        t0 = time.perf_counter()
        span(xs)
        _sync(param.device)
        forward_s = time.perf_counter() - t0
    return {"inference_rps": n / max(step_s, 1e-9), "forward_rps": n * tokens / max(forward_s, 1e-9)}


def network_rps(hidden_size: int, dtype: torch.dtype, bandwidth_mbps: float) -> float:
    bits_per_token = hidden_size * torch.finfo(dtype).bits
    return bandwidth_mbps * 1e6 / bits_per_token


def get_throughput(
    span: BlockSpan,
    *,
    model_key: str,
    override: float | None = None,
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS,
    remeasure: bool = False,
    cache_file: Path | None = None,
) -> dict[str, float]:
    """Per-block rates for this server: from the disk cache, else measured now (and cached)."""
    param = next(p for p in span.parameters() if p.is_floating_point())  # not a quantized weight
    key = (
        f"v{CACHE_VERSION}|{model_key}|{device_name(param.device)}|{str(param.dtype).removeprefix('torch.')}"
        + _quant_suffix(span)
    )
    path = cache_file or cache_root() / "throughput.json"
    cached = _read(path)
    compute = cached.get(key)
    if compute is None or remeasure:
        compute = measure_compute(span)
        cached[key] = compute
        _write(path, cached)
        logger.info(
            "measured %.0f decode steps/s and %.0f tokens/s per block (%s)",
            compute["inference_rps"],
            compute["forward_rps"],
            key,
        )
    net = network_rps(int(span.spec.hidden_size), param.dtype, bandwidth_mbps)
    throughput = override if override is not None else min(compute["forward_rps"], net)
    return {**compute, "network_rps": net, "throughput": float(throughput)}


def _read(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v for k, v in data.items() if isinstance(v, dict) and {"inference_rps", "forward_rps"} <= set(v)
    }


def _write(path: Path, data: dict[str, dict[str, float]]) -> None:
    """Atomic replace, so servers starting together never read a half-written file."""
    with contextlib.suppress(OSError):
        write_json_atomically(path, data, indent=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quant_suffix(span: BlockSpan) -> str:
    """Quantized spans run other kernels, so their rates are cached apart (unquantized keys stay as they were)."""
    from potluck.models.quant import module_quant

    quant = module_quant(span)
    return "" if quant == "none" else f"|{quant}"
