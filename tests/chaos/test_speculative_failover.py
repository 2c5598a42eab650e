"""Chaos: a server is SIGKILLed between a speculative round that rejected proposals and the next one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.cli.local_swarm import LocalSwarm
from potluck.client.speculative import LocalDraft, SpeculationStats, add_weight_noise
from potluck.models import LocalCausalLM

pytestmark = [pytest.mark.swarm, pytest.mark.chaos]

KIND = "llama-gqa-llama3rope"
NEW_TOKENS = 24
FAIL_AFTER = 6  # kill once at least this many new tokens exist and the last round rejected a proposal


class KillAfterARejection:
    """Streamer: after ``at`` tokens, at the first token of a round that ended in a rejected proposal, kill.

    Stats are updated before a round's tokens are streamed, so a rise in ``first_rejections`` since the previous
    token means this round was cut short: the servers' caches hold rejected positions the client rolled back.
    """

    def __init__(self, at: int, stats: SpeculationStats, kill: Any) -> None:
        self.at, self.stats, self.kill = at, stats, kill
        self.seen, self.rejections, self.killed_at = -1, 0, -1  # -1: the prompt is put first

    def put(self, value: Any) -> None:
        self.seen += 1
        rejected = self.stats.first_rejections > self.rejections
        self.rejections = self.stats.first_rejections
        if self.killed_at < 0 and self.seen >= self.at and rejected:
            self.killed_at = self.seen
            self.kill()

    def end(self) -> None:
        pass


@pytest.fixture()
def swarm(tmp_path: Any) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path / "logs") as s:
        s.start_bootstrap()
        yield s


def test_sigkill_mid_speculation_with_a_standby_server(swarm: LocalSwarm, tiny_model_dir: Any) -> None:
    path = str(tiny_model_dir(KIND))
    prompt = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(42))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    procs = [
        swarm.start_server(path, span, wait=False, extra_args=["--update-period", "2"])
        for span in ((0, 4), (4, 8), (4, 8))
    ]
    swarm.wait_ready(procs)
    draft = LocalDraft(add_weight_noise(LocalCausalLM.from_pretrained(path), 0.1, seed=1))  # type: ignore[arg-type]
    stats = SpeculationStats()
    with (
        AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, load_tokenizer=False, step_timeout=10.0
        ) as model,
        model.inference_session(max_length=64) as session,
    ):
        victim = next(p for p in procs if p.peer_id == session.remote.hops[1].peer_id)
        streamer = KillAfterARejection(FAIL_AFTER, stats, lambda: swarm.kill(victim))
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            streamer=streamer,
            assistant_model=draft,
            num_assistant_tokens=3,
            num_assistant_tokens_schedule="constant",
            speculation_stats=stats,
        )
        assert streamer.killed_at >= FAIL_AFTER and session.remote.failovers == 1
        assert victim.peer_id not in [h.peer_id for h in session.remote.hops]
        assert stats.accepted > 0 and stats.first_rejections > 0
    assert torch.equal(out, expected)
