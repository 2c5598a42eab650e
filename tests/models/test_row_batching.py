"""RowBatcher (models/row_batching.py): concurrent callers share one call, each gets exactly its own rows."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest
import torch

from potluck.models import LocalCausalLM
from potluck.models.row_batching import RowBatcher


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + x.sum(-1, keepdim=True)  # row i of the output depends on row i only


def _run_threads(batcher: RowBatcher, inputs: list[torch.Tensor]) -> list[Any]:
    results: list[Any] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher(inputs[i])
        except Exception as e:  # noqa: BLE001 - checked by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_callers_share_calls_and_get_their_own_rows() -> None:
    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)  # while one call runs, the other threads queue up
        return _rowwise(x)

    batcher = RowBatcher(slow, max_rows=64)
    inputs = [torch.randn(1 + i % 3, 5) for i in range(8)]
    results = _run_threads(batcher, inputs)
    for x, got in zip(inputs, results, strict=True):
        assert torch.equal(got, _rowwise(x))
    assert batcher.rows == sum(x.shape[0] for x in inputs)
    assert batcher.calls < len(inputs)  # some calls carried several callers' rows


def test_max_rows_bounds_a_call() -> None:
    sizes: list[int] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        time.sleep(0.02)
        return _rowwise(x)

    batcher = RowBatcher(record, max_rows=3)
    inputs = [torch.randn(2, 4) for _ in range(6)]
    results = _run_threads(batcher, inputs)
    assert all(torch.equal(got, _rowwise(x)) for x, got in zip(inputs, results, strict=True))
    assert max(sizes) <= 3 and sum(sizes) == 12


def test_an_error_reaches_every_caller_of_that_call_and_the_batcher_goes_on() -> None:
    fail = threading.Event()
    fail.set()

    def flaky(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        if fail.is_set():
            raise RuntimeError("boom")
        return _rowwise(x)

    batcher = RowBatcher(flaky)
    results = _run_threads(batcher, [torch.randn(1, 3) for _ in range(4)])
    assert all(isinstance(r, RuntimeError) for r in results)
    fail.clear()
    x = torch.randn(2, 3)
    assert torch.equal(batcher(x), _rowwise(x))


def test_a_lone_caller_never_waits_for_others() -> None:
    batcher = RowBatcher(_rowwise, settle=3600.0)  # a wait would hang the thread below
    done = threading.Event()

    def lone() -> None:
        for _ in range(3):
            batcher(torch.randn(1, 2))
        done.set()

    thread = threading.Thread(target=lone, daemon=True)
    thread.start()
    assert done.wait(timeout=30)
    assert batcher.calls == 3


def test_lm_head_batches_threads_and_copies_get_their_own_batcher(tiny_model_dir: Any) -> None:
    model = LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))
    hidden = [torch.randn(1, 1, model.client.spec.hidden_size) for _ in range(6)]
    with torch.no_grad():
        expected = [model.client._head_rows(h) for h in hidden]  # noqa: SLF001 - the unbatched path

    def head(h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.client.head(h)

    batcher = model.client.shared_head
    results: list[Any] = [None] * len(hidden)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, head(hidden[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert batcher.rows == 6
    clone = copy.deepcopy(model)
    assert clone.client.shared_head is not batcher
    with torch.no_grad():
        clone.client.norm.weight.mul_(2)
        with torch.inference_mode():
            assert not torch.allclose(clone.client.head(hidden[0]), model.client.head(hidden[0]))


def test_row_batcher_checks_max_rows() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        RowBatcher(_rowwise, max_rows=0)
