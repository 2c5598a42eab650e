"""The speculative bench's agreement string: what the draft got right, token by token, and the round trips it
allows."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from potluck.cli.bench_speculative import agreement, fewest_round_trips
from potluck.client.drafts import LocalDraft, SpanRunner, add_weight_noise
from potluck.client.generation import GenerationParams, generate_tokens
from potluck.models import LocalCausalLM


def _greedy(model: LocalCausalLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    runner = SpanRunner(model.client, model.span, prompt.shape[1] + n)
    with torch.inference_mode():
        step = lambda ids: runner.run(ids, runner.length, 1)[:, -1]  # noqa: E731
        return generate_tokens(step, prompt, GenerationParams(max_new_tokens=n))  # [1, T + n]


def test_agreement_marks_first_and_second_choices(tiny_model_dir: Callable[[str], str]) -> None:
    target = LocalCausalLM.from_pretrained(tiny_model_dir("llama-gqa-llama3rope"))
    prompt, n = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), 24
    sequence = _greedy(target, prompt, n)
    assert agreement(LocalDraft(target), sequence, n) == "1" * n  # the target as its own draft
    noisy = add_weight_noise(copy.deepcopy(target), 1.0, seed=3)
    expected = ""
    with torch.inference_mode():  # each prefix from scratch, no cache
        for i in range(n):
            prefix = sequence[:, : prompt.shape[1] + i]
            first, second = noisy(input_ids=prefix).logits[0, -1].topk(2).indices.tolist()
            token = int(sequence[0, prompt.shape[1] + i])
            expected += "1" if first == token else "2" if second == token else "0"
    got = agreement(LocalDraft(noisy), sequence, n)
    assert got == expected and set(got) != {"1"}  # the noisy draft is wrong somewhere


def test_fewest_round_trips_propose_each_run_of_ones() -> None:
    assert fewest_round_trips("", 8) == 0
    assert fewest_round_trips("2202", 8) == 4  # every token is the target's own
    assert fewest_round_trips("1111", 8) == 1  # three proposals kept, then the target's token
    assert fewest_round_trips("11111", 2) == 2  # at most two proposals a round
    assert fewest_round_trips("1101110", 8) == 2  # "11" + the 0, then "111" + the last
