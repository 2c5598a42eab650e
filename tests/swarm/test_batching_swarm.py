"""Many sessions at once through real server processes: batched decode steps stay exact vs transformers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tiny_model_dir(KIND)
    with LocalSwarm(tmp_path_factory.mktemp("batching-logs")) as s:
        s.start_bootstrap()
        # a small step budget so the longer prompts' prefills are chunked between other sessions' decode steps
        extra = ["--step-token-budget", "16"]
        procs = [s.start_server(path, span, wait=False, extra_args=extra) for span in ((0, 4), (4, 8))]
        s.wait_ready(procs)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=s.initial_peers, load_tokenizer=False
        )
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        try:
            yield {"model": model, "hf": hf}
        finally:
            model.shutdown()


def test_eight_concurrent_sessions_with_different_lengths_and_start_times(swarm: dict[str, Any]) -> None:
    model, hf = swarm["model"], swarm["hf"]
    gen = torch.Generator().manual_seed(0)
    # (prompt length, start delay in s, new tokens): sessions join and leave while others decode
    plans = [(5, 0.0, 24), (40, 0.0, 16), (12, 0.3, 20), (3, 0.6, 8), (27, 0.2, 24), (9, 1.0, 12), (18, 0.1, 6),
             (33, 0.5, 18)]  # fmt: skip
    prompts = [torch.randint(3, 250, (1, n), generator=gen) for n, _, _ in plans]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            time.sleep(plans[i][1])
            results[i] = model.generate(prompts[i], max_new_tokens=plans[i][2], eos_token_id=None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, prompt in enumerate(prompts):
        expected = hf.generate(prompt, max_new_tokens=plans[i][2], do_sample=False, eos_token_id=None)
        assert torch.equal(results[i], expected), i


def test_left_padded_batch_matches_transformers(swarm: dict[str, Any]) -> None:
    model, hf = swarm["model"], swarm["hf"]
    gen = torch.Generator().manual_seed(1)
    lengths = [11, 4, 7]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 250, (n,), generator=gen)
        mask[row, -n:] = 1
    kwargs: dict[str, Any] = {"max_new_tokens": 10, "pad_token_id": 0, "eos_token_id": None}
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs), expected)


def test_beam_search_through_the_swarm_matches_transformers(swarm: dict[str, Any]) -> None:
    model, hf = swarm["model"], swarm["hf"]
    prompt = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs: dict[str, Any] = {
        "max_new_tokens": 10,
        "num_beams": 3,
        "eos_token_id": [5, 17, 99],
        "pad_token_id": 0,
    }
    expected = hf.generate(prompt, do_sample=False, **kwargs)
    assert torch.equal(model.generate(prompt, **kwargs), expected)
