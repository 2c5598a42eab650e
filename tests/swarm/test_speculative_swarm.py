"""Speculative decoding through a loopback swarm of real servers: greedy output is plain greedy output."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.client.generation import GenerationParams
from potluck.client.speculative import (
    CachedLM,
    DraftLengthController,
    LocalDraft,
    SpanRunner,
    SpeculationStats,
    add_weight_noise,
    speculative_generate,
)
from potluck.models import LocalCausalLM

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
NEW_TOKENS = 24
HALF_RIGHT_NOISE, HALF_RIGHT_SEED = 0.1, 1  # measured: about half of this draft's proposals are kept


class NeverRightDraft:
    """The target itself, with its logits shifted by one token id: its greedy pick is never the target's."""

    def __init__(self, model: LocalCausalLM) -> None:
        self.inner = LocalDraft(model)

    def runner(self, max_length: int) -> CachedLM:
        return _ShiftedRunner(self.inner.runner(max_length))


class _ShiftedRunner:
    def __init__(self, inner: CachedLM) -> None:
        self.inner = inner

    @property
    def length(self) -> int:
        return self.inner.length

    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        logits = self.inner.run(ids, position, num_logits)
        return torch.roll(logits, shifts=1, dims=-1)  # argmax -> argmax + 1

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)


def half_right_draft(path: str) -> LocalDraft:
    model = LocalCausalLM.from_pretrained(path)
    return LocalDraft(add_weight_noise(model, HALF_RIGHT_NOISE, seed=HALF_RIGHT_SEED))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir: Any) -> str:
    return str(tiny_model_dir(KIND))


@pytest.fixture(scope="module")
def swarm(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("spec-logs")) as s:
        s.start_bootstrap()
        s.wait_ready([s.start_server(model_path, span, wait=False) for span in ((0, 3), (3, 8))])
        yield s


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm, model_path: str) -> Iterator[Any]:
    with AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=swarm.initial_peers, load_tokenizer=False
    ) as model:
        yield model


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def plain(client: Any, model_path: str, prompt: torch.Tensor) -> torch.Tensor:
    """Plain greedy generation through the swarm, itself equal to transformers' generate."""
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    expected = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    out = client.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert torch.equal(out, expected)
    return out


@pytest.mark.parametrize("draft_kind", ["always_right", "never_right", "half_right"])
def test_greedy_speculation_equals_plain_greedy(
    client: Any, model_path: str, prompt: torch.Tensor, plain: torch.Tensor, draft_kind: str
) -> None:
    target_copy = LocalCausalLM.from_pretrained(model_path)
    draft = {
        "always_right": lambda: LocalDraft(target_copy),
        "never_right": lambda: NeverRightDraft(target_copy),
        "half_right": lambda: half_right_draft(model_path),
    }[draft_kind]()
    stats = SpeculationStats()
    out = client.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        assistant_model=draft,
        num_assistant_tokens=3,
        num_assistant_tokens_schedule="constant",
        speculation_stats=stats,
    )
    assert torch.equal(out, plain)
    assert stats.new_tokens == NEW_TOKENS and stats.drafted > 0
    if draft_kind == "always_right":
        assert stats.accepted == stats.drafted and stats.rounds == NEW_TOKENS // 4  # 4 tokens per round trip
    elif draft_kind == "never_right":
        assert stats.accepted == 0 and stats.rounds == NEW_TOKENS  # one token per round trip, still exact
    else:
        assert 0.3 <= stats.token_acceptance <= 0.7, stats


def test_speculation_continues_a_session_with_plain_steps(
    client: Any, model_path: str, prompt: torch.Tensor, plain: torch.Tensor
) -> None:
    """Rejected positions never leak into a session's caches: speculative and plain calls interleave exactly."""
    draft = half_right_draft(model_path)
    n = prompt.shape[1]
    with client.inference_session(max_length=64) as session:
        a = client.generate(prompt, max_new_tokens=8, eos_token_id=None, assistant_model=draft)
        assert session.position == n + 7  # as after plain generation: the last token is not yet fed
        b = client.generate(None, max_new_tokens=8, eos_token_id=None)
        c = client.generate(None, max_new_tokens=8, eos_token_id=None, assistant_model=draft)
        assert session.position == n + NEW_TOKENS - 1
        assert all(h.history.length == session.position for h in session.remote.hops)
    assert torch.equal(a, plain[:, : n + 8]) and torch.equal(b, plain[:, : n + 16])
    assert torch.equal(c, plain)


def test_sampled_speculation_through_the_swarm_matches_a_local_target(
    client: Any, model_path: str, prompt: torch.Tensor
) -> None:
    """Same seed, same draft: the swarm as target gives the same sampled tokens as the model in-process
    (the distribution itself is tested on the acceptance rule, tests/client/test_speculative_rule.py)."""
    draft = half_right_draft(model_path)
    sampling = dict(do_sample=True, temperature=0.9, top_k=50, repetition_penalty=1.1)
    torch.manual_seed(7)
    remote_stats = SpeculationStats()
    out = client.generate(
        prompt, max_new_tokens=24, eos_token_id=None, assistant_model=draft, num_assistant_tokens=3,
        num_assistant_tokens_schedule="constant", speculation_stats=remote_stats, **sampling,
    )  # fmt: skip
    target = LocalCausalLM.from_pretrained(model_path)
    torch.manual_seed(7)
    local_stats = SpeculationStats()
    expected = speculative_generate(
        SpanRunner(target.client, target.span, 64),
        draft.runner(64),
        prompt,
        GenerationParams(max_new_tokens=24, **sampling),  # type: ignore[arg-type]
        DraftLengthController(3, 3, adaptive=False),
        vocab_size=target.spec.vocab_size,
        stats=local_stats,
    )
    assert torch.equal(out, expected)
    assert remote_stats.rounds == local_stats.rounds and 0 < remote_stats.accepted < remote_stats.drafted


def test_batched_input_is_refused(client: Any, model_path: str) -> None:
    draft = LocalDraft(LocalCausalLM.from_pretrained(model_path))
    with pytest.raises(ValueError, match="one sequence"):
        client.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=4, assistant_model=draft)


def test_draft_by_path_and_copy(
    client: Any, model_path: str, prompt: torch.Tensor, plain: torch.Tensor
) -> None:
    """``assistant_model`` also takes a checkpoint path (loaded as our local model) or a transformers model."""
    out = client.generate(prompt, max_new_tokens=8, eos_token_id=None, assistant_model=model_path)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out_hf = client.generate(prompt, max_new_tokens=8, eos_token_id=None, assistant_model=copy.deepcopy(hf))
    assert torch.equal(out, plain[:, : prompt.shape[1] + 8]) and torch.equal(out_hf, out)
