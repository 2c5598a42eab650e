"""``potluck bench inference --draft ...``: tokens/s with and without a speculative draft over a loopback swarm.

The WAN is emulated with ``--link-delay-ms`` (every process, client and servers, delays what it sends by that
much: ``swarm/link.py``), so a plain token costs ``2 * servers * delay`` of waiting plus compute while hidden
states return to the client between hops, and a speculative round the same wait for several tokens. The random bench model has no natural small draft, so the
draft is made from the target. ``--draft-int8`` is the standard one: the model itself with its blocks' linear layers
and its LM head quantised to int8 (dynamic quantisation: ~2.5x cheaper per token on CPU), which agrees with the
fp32 target on ~70% of tokens of the random bench model, so no noise is needed. ``--draft-noise`` adds Gaussian
noise to the draft's weights (a draft of chosen quality), ``--draft-blocks`` keeps only its first blocks (on the
random bench model an early exit agrees with the target almost never, unlike trained models). Module-level
imports stay light: ``main.py`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def add_bench_draft_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--draft", default=None, metavar="MODEL",
        help="speculative decoding with this draft checkpoint (default with --draft-noise/--draft-int8: the model)",
    )  # fmt: skip
    b.add_argument(
        "--draft-noise", type=float, default=None, metavar="STD",
        help="add Gaussian noise of STD x each weight's std to the draft (a draft of chosen quality)",
    )  # fmt: skip
    b.add_argument(
        "--draft-int8", action="store_true",
        help="the draft is the model with blocks and LM head in int8 (agrees on ~70%% of tokens of the bench model)",
    )  # fmt: skip
    b.add_argument("--draft-blocks", type=int, default=None, help="keep only the draft's first N blocks")
    b.add_argument("--draft-seed", type=int, default=0, help="seed of the draft's noise")
    b.add_argument("--num-assistant-tokens", type=int, default=4, help="draft tokens per round to start with")
    b.add_argument(
        "--rounds", type=int, default=3,
        help="with a draft: plain and speculative runs alternated this many times; speedups are their medians",
    )  # fmt: skip


def wants_draft(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "draft", None)
        or getattr(args, "draft_noise", None) is not None
        or getattr(args, "draft_int8", False)
        or getattr(args, "draft_blocks", None) is not None
    )


def build_bench_draft(args: argparse.Namespace, model_path: str) -> Any:
    from potluck.client.drafts import LocalDraft, add_weight_noise, int8_draft
    from potluck.models import LocalCausalLM

    model = LocalCausalLM.from_pretrained(args.draft or model_path)
    if args.draft_noise:
        add_weight_noise(model, args.draft_noise, seed=args.draft_seed)
    if args.draft_int8:
        return int8_draft(model, num_blocks=args.draft_blocks)
    return LocalDraft(model, num_blocks=args.draft_blocks)


def agreement(draft: Any, sequence: Any, new_tokens: int) -> str:
    """For each of the last ``new_tokens`` tokens of ``sequence [1, L]`` (the target's greedy output): ``1`` where
    the draft's first choice after the true prefix was that token, ``2`` where its second was, else ``0``.

    Greedy speculation is fixed by this string: a round keeps the run of ``1`` s from its position (at most its
    proposals) plus the target's own token; after a ``2`` the lookahead can have the next round drafted (if it
    drafted that branch in time). ``scripts/speculation_model.py`` replays rounds over it."""
    import torch

    runner = draft.runner(sequence.shape[1])
    with torch.inference_mode():
        logits = runner.run(sequence[:, :-1], 0, num_logits=new_tokens)[0]  # [N, V_draft]
    guesses = logits.topk(min(2, logits.shape[-1])).indices.tolist()  # [N, 2]
    tokens = sequence[0, -new_tokens:].tolist()
    return "".join(
        "1" if guess[0] == token else "2" if guess[1:] == [token] else "0"
        for guess, token in zip(guesses, tokens, strict=True)
    )


def fewest_round_trips(pattern: str, maximum: int) -> int:
    """Round trips a policy that knew ``pattern`` would need, with at most ``maximum`` proposals a round: each
    round proposes exactly the coming run of ``1`` s."""
    position, rounds = 0, 0
    while position < len(pattern):
        run = 0
        while run < maximum and position + run < len(pattern) - 1 and pattern[position + run] == "1":
            run += 1
        position += run + 1
        rounds += 1
    return rounds


RUNS = ("plain", "draft")


def _generate_run(
    args: argparse.Namespace, model: Any, prompt: Any, draft: Any, name: str, outputs: dict[str, list[Any]]
) -> dict[str, Any]:
    """One ``generate`` through the swarm, plain or with the draft; its tokens go to ``outputs[name]``."""
    from potluck.client.speculative import SpeculationStats

    clock, stats = _Clock(), SpeculationStats()
    speculation: dict[str, Any] = {}
    if name == "draft":
        speculation = dict(
            assistant_model=draft, num_assistant_tokens=args.num_assistant_tokens, speculation_stats=stats
        )
    t0 = time.perf_counter()
    outputs[name].append(
        model.generate(
            prompt, max_new_tokens=args.new_tokens, eos_token_id=None, streamer=clock, **speculation
        )
    )
    total = time.perf_counter() - t0
    run: dict[str, Any] = {
        "seconds": round(total, 3),
        "tokens_per_s": round(args.new_tokens / total, 3),
        "decode_tokens_per_s": round(clock.decode_rate(), 3),
        "decode_ms_per_round_trip": round(1000 / max(clock.decode_rate(), 1e-9), 2),
    }
    if name == "draft":
        run.update(stats.as_dict())
        # a round is (a round trip + checking the proposals) + drafting them
        run["decode_ms_per_round_trip"] = round(
            stats.round_ms + stats.draft_ms_per_token * stats.drafted / max(stats.rounds, 1), 2
        )
        gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
        run["median_token_gap_ms"] = round(statistics.median(gaps) * 1000, 3)
    return run


class _Clock:
    """Streamer that timestamps every token (speculative rounds stream several at once)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_rate(self) -> float:
        """New tokens per second after the first one (the prompt's prefill excluded)."""
        new = self.times[1:]  # times[0] is the prompt
        return (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 and new[-1] > new[0] else 0.0


def bench_inference_with_draft(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from potluck.cli.bench import _even_spans, alternated_rounds, bench_client, median_round
    from potluck.cli.errors import UsageError
    from potluck.cli.local_swarm import link_swarm
    from potluck.cli.sample_models import bench_model_path
    from potluck.client.speculative import Speculation
    from potluck.models import load_config

    model_path = args.model or bench_model_path()
    config = load_config(model_path)
    spans = _even_spans(int(config.num_hidden_layers), args.servers)
    torch.manual_seed(0)
    prompt = torch.randint(0, int(config.vocab_size), (1, args.prompt_tokens))
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    draft = build_bench_draft(args, model_path)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in RUNS}
    with link_swarm(args.link_delay_ms, args.link_mbps) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_server(model_path, s, wait=False, extra_args=["--throughput", "100"]) for s in spans
        ]
        swarm.wait_ready(procs)
        with bench_client(args, model_path, swarm.initial_peers) as model:
            model.generate(prompt[:, :8], max_new_tokens=2, eos_token_id=None)  # warm up routes and servers
            rounds = alternated_rounds(
                args,
                "plain, then with the draft",
                lambda: {name: _generate_run(args, model, prompt, draft, name, outputs) for name in RUNS},
            )
    for pair in rounds:
        pair["speedup"] = round(pair["draft"]["tokens_per_s"] / pair["plain"]["tokens_per_s"], 3)
        pair["decode_speedup"] = round(
            pair["draft"]["decode_tokens_per_s"] / max(pair["plain"]["decode_tokens_per_s"], 1e-9), 3
        )
    runs = median_round(rounds, "speedup")
    plain, spec = runs["plain"], runs["draft"]
    pattern = agreement(draft, outputs["plain"][0], args.new_tokens)
    # the cap generate() put on the adaptive k
    maximum = Speculation(draft, args.num_assistant_tokens).controller().maximum
    return {
        "bench": "inference_speculative",
        "model": model_path,
        "servers": len(spans),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "link_delay_ms": args.link_delay_ms,  # emulated one-way delay of every message each process sends
        "link_mbps": args.link_mbps,
        "draft": {
            "model": args.draft or model_path,
            "noise": args.draft_noise,
            "int8": args.draft_int8,
            "blocks": args.draft_blocks,
            "seed": args.draft_seed,
            "num_assistant_tokens": args.num_assistant_tokens,
        },
        "plain": plain,
        "speculative": spec,
        "tokens_per_round_trip": spec["tokens_per_round"],
        "acceptance_rate": spec["acceptance_rate"],
        "token_acceptance": spec["token_acceptance"],
        "draft_ms_per_token": spec["draft_ms_per_token"],  # what one proposal costs the client
        "round_ms": spec[
            "round_ms"
        ],  # a target step of k + 1 positions (vs plain's decode_ms_per_round_trip)
        # what the draft got right, token by token (see agreement()), and the fewest round trips it allows
        "draft_agreement": {
            "pattern": pattern,
            "first_choice": round(pattern.count("1") / max(1, len(pattern)), 3),
            "second_when_first_wrong": round(
                pattern.count("2") / max(1, len(pattern) - pattern.count("1")), 3
            ),
            "fewest_round_trips": fewest_round_trips(pattern, maximum),
        },
        "tokens_per_s_plain": plain["tokens_per_s"],
        "tokens_per_s_draft": spec["tokens_per_s"],
        "rounds": len(rounds),
        # medians over the rounds of each round's ratio ("plain" and "speculative" are the median round's runs)
        "speedup": round(statistics.median(pair["speedup"] for pair in rounds), 3),
        "decode_speedup": round(statistics.median(pair["decode_speedup"] for pair in rounds), 3),
        "per_round": [
            {key: pair[key] for key in ("speedup", "decode_speedup")}
            | {f"tokens_per_s_{name}": pair[name]["tokens_per_s"] for name in RUNS}
            for pair in rounds
        ],
        # every run, plain or speculative, produced the same tokens
        "outputs_equal": all(
            torch.equal(outputs["plain"][0], out) for outs in outputs.values() for out in outs
        ),
        "torch_threads": torch.get_num_threads(),
    }
