#!/usr/bin/env python
"""Where a speculative run's time goes, without timing noise: replay greedy rounds over a known agreement pattern.

    .venv/bin/python scripts/speculation_model.py [--noise 0.03] [--seeds 0,1,2,3] [--new-tokens 64]

Greedy speculation is determined by one string per generation: for every output token, whether the draft's first
choice (``1``), its second (``2``) or neither (``0``) was the target's token, the draft reading the true prefix.
A round with ``n`` proposals keeps the run of ``1`` s from its position (at most ``n``) plus the target's own
token, so the number of round trips any policy needs follows from the string alone. This script

1. records that string for the bench model (``potluck bench inference``'s target and prompt; seed 0 is the bench's
   own prompt) against its int8 draft with ``--noise`` (the official 16 run uses 0.03);
2. replays each with the client's real :class:`DraftLengthController` and a cost model of this machine's parts
   (seconds, see ``COSTS``), the lookahead worker approximated: each round trip buys ``round / worker`` draft
   steps, spent by the same worth rule as ``client/lookahead.py`` (branch chance x acceptance per proposal, none
   below ``MIN_WORTH``); a round whose answer was not drafted ahead drafts ``k`` proposals on the critical path;
3. prints, as JSON, the modelled speedup over plain decoding with this machine's costs, then with each cost
   removed in turn, and the bound of a policy that knows the string (``oracle``).

It is a model, not a measurement: its use is to tell which cost keeps a run from its goal, and to try a policy
change on many strings at once before paying for noisy benchmarks. The costs were measured on the development VM
(2 vCPU Intel Xeon, 4 loopback servers, 25 ms link delay): plain token 185 ms; +6.5 ms per checked position;
+15 ms per round while the worker drafts beside the servers; 18 ms per critical-path draft token (2 threads);
30 ms per draft step on the worker (1 thread, beside the servers).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from potluck.cli.bench_speculative import fewest_round_trips
from potluck.client.lookahead import MIN_WORTH
from potluck.client.speculative import DraftLengthController


@dataclass(frozen=True)
class Costs:
    plain: float = 0.185  # one plain token through the swarm (round trip + every hop's compute)
    per_position: float = 0.0065  # each more position checked in a round (servers' rows + the client's head)
    contention: float = 0.015  # added to a round while the worker drafts beside the servers
    critical: float = 0.018  # one draft token on the critical path
    worker: float = 0.030  # one draft step on the worker thread


COSTS = Costs()


def agreement(noise: float, seed: int, new_tokens: int) -> str:
    """The ``0/1/2`` string of the bench model's greedy continuation of prompt ``seed`` against the int8 draft."""
    from potluck.cli.bench_speculative import agreement as bench_agreement
    from potluck.cli.bench_speculative import build_bench_draft
    from potluck.cli.sample_models import bench_model_path
    from potluck.client.drafts import SpanRunner
    from potluck.client.generation import GenerationParams, generate_tokens
    from potluck.models import LocalCausalLM, load_config

    path = bench_model_path()
    vocab = int(load_config(path).vocab_size)
    torch.manual_seed(seed)  # as potluck bench inference draws its prompt (seed 0)
    prompt = torch.randint(0, vocab, (1, 128))
    target = LocalCausalLM.from_pretrained(path)
    args = argparse.Namespace(draft=None, draft_noise=noise, draft_seed=0, draft_int8=True, draft_blocks=None)
    draft = build_bench_draft(args, path)
    runner = SpanRunner(target.client, target.span, prompt.shape[1] + new_tokens)
    with torch.inference_mode():
        sequence = generate_tokens(
            lambda ids: runner.run(ids, runner.length, 1)[:, -1],
            prompt,
            GenerationParams(max_new_tokens=new_tokens),
        )  # [1, 128 + new_tokens]
    return bench_agreement(draft, sequence, new_tokens)


def _run_of_ones(pattern: str, start: int, limit: int) -> int:
    run = 0
    while run < limit and start + run < len(pattern) and pattern[start + run] == "1":
        run += 1
    return run


def replay(pattern: str, costs: Costs, k: int = 4, maximum: int = 8) -> dict[str, Any]:
    """Greedy rounds over ``pattern`` with the client's controller; modelled seconds and the speedup."""
    controller = DraftLengthController(k, maximum)
    position, seconds, rounds, ready = 0, 0.0, 0, 0  # ready: proposals drafted ahead for this round's answer
    while position < len(pattern):
        room = len(pattern) - position - 1
        ahead = min(ready, controller.k_ahead, room)
        critical = max(0, min(controller.k, room) - ahead)
        proposals = ahead + critical
        kept = _run_of_ones(pattern, position, proposals)
        round_s = costs.plain + costs.per_position * proposals + costs.contention
        seconds += critical * costs.critical + round_s
        rounds += 1
        # the worker's steps during this round trip, by worth: branch 1 (all kept, the guess right), branch j
        a, s = min(max(controller.acceptance, 0.05), 0.99), controller.second_right
        branches: dict[int, list[float]] = {
            proposals: [a ** (proposals + 1), -1.0]
        }  # kept -> [chance, drafted]
        for j in range(proposals):
            branches[j] = [a**j * (1 - a) * s, 0.0]
        _spend_worker_steps(branches, a, min(controller.k_ahead, maximum), int(round_s / costs.worker))
        if kept == proposals:  # the branch exists only if the draft guessed the target's own token
            answer_right = position + kept >= len(pattern) or pattern[position + kept] == "1"
        else:
            answer_right = pattern[position + kept] == "2"
            controller.count_second_choice(answer_right)
        ready = int(max(branches[kept][1], 0)) if answer_right else 0
        controller.update(proposals, kept, critical * costs.critical, round_s, drafted=critical)
        position += kept + 1
    return {
        "rounds": rounds,
        "seconds": round(seconds, 3),
        "speedup": round(len(pattern) * costs.plain / seconds, 3),
    }


def _spend_worker_steps(branches: dict[int, list[float]], a: float, depth: int, steps: int) -> None:
    """Give up to ``steps`` draft steps, one at a time, to the branch whose next proposal is worth most."""

    def worth(kept: int) -> float:
        chance, drafted = branches[kept]
        return chance * a ** max(drafted, 0.0) if drafted < depth else -1.0

    for _ in range(steps):
        best = max(branches, key=worth)
        if worth(best) < MIN_WORTH:
            return
        branches[best][1] += 1


def oracle(pattern: str, costs: Costs, maximum: int = 8) -> dict[str, Any]:
    """A policy that knows the string: each round proposes exactly the coming run of ``1`` s, drafted for free and
    without contention; it still pays for checking them (each round adds its proposals + 1 tokens, so all rounds
    check ``len(pattern) - rounds`` proposals)."""
    rounds = fewest_round_trips(pattern, maximum)
    seconds = rounds * costs.plain + (len(pattern) - rounds) * costs.per_position
    return {
        "rounds": rounds,
        "seconds": round(seconds, 3),
        "speedup": round(len(pattern) * costs.plain / seconds, 3),
    }


STEPS: tuple[tuple[str, dict[str, float]], ...] = (  # each removes one more cost
    ("this machine", {}),
    ("no contention", {"contention": 0.0}),
    ("free critical-path drafting", {"contention": 0.0, "critical": 0.0}),
    ("free checking", {"contention": 0.0, "critical": 0.0, "per_position": 0.0}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--noise", type=float, default=0.03, help="draft weight noise on top of int8 (default: 0.03)"
    )
    p.add_argument(
        "--seeds", default="0,1,2,3", help="prompt seeds; 0 is the bench's prompt (default: 0,1,2,3)"
    )
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    args = p.parse_args()
    report = []
    for seed in (int(s) for s in args.seeds.split(",")):
        pattern = agreement(args.noise, seed, args.new_tokens)
        entry: dict[str, Any] = {
            "seed": seed,
            "pattern": pattern,
            "first_choice": round(pattern.count("1") / len(pattern), 3),
            "second_when_first_wrong": round(
                pattern.count("2") / max(1, len(pattern) - pattern.count("1")), 3
            ),
        }
        for name, change in STEPS:
            entry[name] = replay(pattern, replace(COSTS, **change))
        entry["oracle"] = oracle(pattern, COSTS)
        report.append(entry)
        print(f"seed {seed}: done", file=sys.stderr, flush=True)
    print(json.dumps({"noise": args.noise, "costs": COSTS.__dict__, "generations": report}, indent=1))


if __name__ == "__main__":
    main()
