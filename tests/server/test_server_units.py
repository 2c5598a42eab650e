"""Server pieces without a network: throughput cache, block sizing, cache budget, runtime priorities."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from potluck.models import load_config, load_span
from potluck.server import throughput as tp
from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.placement import block_bytes, cache_bytes_per_block, size_num_blocks
from potluck.server.runtime import PRIORITY_FORWARD, PRIORITY_INFERENCE, Runtime


def test_throughput_is_measured_once_then_read_from_disk(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    span = load_span(tiny_model_dir("llama-gqa-llama3rope"), 0, 2)
    calls: list[int] = []
    real = tp.measure_compute

    def counting(s: Any, **kw: Any) -> dict[str, float]:
        calls.append(1)
        return real(s, **kw)

    monkeypatch.setattr(tp, "measure_compute", counting)
    cache = tmp_path / "throughput.json"
    first = tp.get_throughput(span, model_key="m", cache_file=cache, bandwidth_mbps=10)
    second = tp.get_throughput(span, model_key="m", cache_file=cache, bandwidth_mbps=10)
    assert len(calls) == 1 and first == second
    assert first["inference_rps"] > 0 and first["forward_rps"] > 0
    assert first["network_rps"] == pytest.approx(10e6 / (64 * 32))
    assert first["throughput"] == min(first["forward_rps"], first["network_rps"])
    tp.get_throughput(span, model_key="other-model", cache_file=cache)  # another key: measured again
    assert len(calls) == 2
    assert tp.get_throughput(span, model_key="m", cache_file=cache, override=7.0)["throughput"] == 7.0
    cache.write_text("{not json")  # a broken cache file is re-measured, not fatal
    tp.get_throughput(span, model_key="m", cache_file=cache)
    assert len(calls) == 3


def test_blocks_are_sized_from_free_memory(tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(tiny_model_dir("llama-gqa-llama3rope"))
    span = load_span(tiny_model_dir("llama-gqa-llama3rope"), 0, 1)
    assert block_bytes(config, torch.float32) == sum(p.numel() for p in span.parameters()) * 4
    assert block_bytes(config, torch.bfloat16) * 2 == block_bytes(config, torch.float32)
    per_block = block_bytes(config, torch.float32) + cache_bytes_per_block(config, torch.float32, 100)
    monkeypatch.setattr(
        "potluck.server.placement.free_memory_bytes", lambda device: int(per_block * 3.5 / 0.8)
    )
    assert size_num_blocks(config, torch.float32, "cpu", 100) == 3
    monkeypatch.setattr("potluck.server.placement.free_memory_bytes", lambda device: 10**15)
    assert size_num_blocks(config, torch.float32, "cpu", 100) == 8  # never more than the model has
    monkeypatch.setattr("potluck.server.placement.free_memory_bytes", lambda device: 1000)
    with pytest.raises(ValueError):
        size_num_blocks(config, torch.float32, "cpu", 100)


def test_cache_budget_waits_for_room_and_times_out() -> None:
    async def scenario() -> None:
        budget = CacheBudget(100)
        async with budget.reserve(60, timeout=0):
            assert budget.left == 40
            with pytest.raises(CacheFullError, match="no KV-cache room"):
                async with budget.reserve(60, timeout=0.05):
                    pass

            async def later() -> int:
                async with budget.reserve(60, timeout=5):
                    return budget.left

            waiter = asyncio.create_task(later())
            await asyncio.sleep(0.05)
            assert not waiter.done()
        assert await waiter == 40
        assert budget.left == 100
        with pytest.raises(CacheFullError, match="whole cache budget"):
            async with budget.reserve(101, timeout=5):
                pass

    asyncio.run(scenario())


def test_runtime_runs_inference_before_queued_training() -> None:
    async def scenario() -> list[str]:
        runtime = Runtime()
        order: list[str] = []
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def block() -> None:  # occupies the compute thread while the others queue up
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()

        first = asyncio.create_task(runtime.run(PRIORITY_FORWARD, block))
        await asyncio.sleep(0.05)
        tasks = [
            asyncio.create_task(runtime.run(PRIORITY_FORWARD, lambda: order.append("train"))),
            asyncio.create_task(runtime.run(PRIORITY_INFERENCE, lambda: order.append("chat"))),
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *tasks)
        runtime.shutdown()
        return order

    assert asyncio.run(scenario()) == ["chat", "train"]
