"""``potluck bench``: benchmarks over a loopback swarm of real processes; each returns one JSON-able dict."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from potluck.cli.local_swarm import LocalSwarm, link_swarm

logger = logging.getLogger(__name__)


def _even_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(servers)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _decode_loop(
    step: Any, head_and_embed: Any, first_ids: torch.Tensor, new_tokens: int
) -> tuple[float, list[float]]:
    """Greedy decode: returns (prefill seconds, per-step seconds), each including embeddings and LM head."""
    ((prefill, steps),) = _paired_decode([(step, *head_and_embed)], first_ids, new_tokens)
    return prefill, steps


def _paired_decode(
    decoders: list[tuple[Any, Any, Any]], first_ids: torch.Tensor, new_tokens: int
) -> list[tuple[float, list[float]]]:
    """Greedy decodes with each ``(step, embed, head)``, taking turns token by token; returns (prefill seconds,
    per-step seconds) for each.

    Why turns: on a shared VM the cores' speed drifts by tens of percent within a minute; a swarm decode timed
    after a local one would compare two machines. Taking turns, both see the same moments.
    """
    logits: list[torch.Tensor] = []
    results: list[tuple[float, list[float]]] = []
    for step, embed, head in decoders:
        t0 = time.perf_counter()
        # [B, V]: the LM head over the last position only, as generate() does
        logits.append(head(step(embed(first_ids))[:, -1:])[:, -1])
        results.append((time.perf_counter() - t0, []))
    for _ in range(new_tokens - 1):
        for i, (step, embed, head) in enumerate(decoders):
            t0 = time.perf_counter()
            next_id = logits[i].argmax(-1, keepdim=True)  # [B, 1]
            logits[i] = head(step(embed(next_id)))[:, -1]
            results[i][1].append(time.perf_counter() - t0)
    return results


def alternated_rounds(
    args: argparse.Namespace, what: str, run_round: Callable[[], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``args.rounds`` results of ``run_round`` (each measures both things a benchmark compares, in turns), with
    progress on stderr unless ``--json``. A ratio of two phases minutes apart on a shared VM would compare two
    machines: the cores' speed drifts by tens of percent within a minute."""
    rounds = []
    for i in range(args.rounds):
        if not args.json:
            print(f"round {i + 1}/{args.rounds}: {what}", file=sys.stderr, flush=True)
        rounds.append(run_round())
    return rounds


def median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose ``key`` is the median one (the upper median for an even count)."""
    return sorted(rounds, key=lambda r: float(r[key]))[len(rounds) // 2]


def bench_client(args: argparse.Namespace, model_path: str, initial_peers: Any, **config: Any) -> Any:
    """A benchmark's client of the loopback swarm: the compression and emulated link the command asked for,
    no tokenizer, plus ``config`` (more ``from_pretrained`` options)."""
    from potluck import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(
        model_path,
        initial_peers=initial_peers,
        compression=args.compression,
        link_delay_ms=args.link_delay_ms,
        link_mbps=args.link_mbps,
        load_tokenizer=False,
        **config,
    )


def _swarm_decode(
    args: argparse.Namespace,
    swarm: Any,
    model_path: str,
    prompt: torch.Tensor,
    max_length: int,
    push: bool,
    local: Any,
) -> dict[str, Any]:
    """One client's greedy decode through ``swarm``, with server-to-server push on or off, taking turns step by
    step with the same decode on ``local`` (a :class:`LocalCausalLM`, the reference)."""
    model = bench_client(
        args,
        model_path,
        swarm.initial_peers,
        use_direct=not args.no_direct,
        verify_fraction=args.verify_fraction,
        verify_seed=0,
        push=push,
    )
    try:
        parts = model.client

        def local_decoder() -> tuple[Any, Any, Any]:
            cache = local.new_cache(1, max_length)
            return (
                lambda h: local.span(local.client.pre_blocks(h), cache=cache),
                local.client.embed,
                local.client.head,
            )

        # untimed warm-up of both: first-call allocations and kernel selection of the embeddings and LM head,
        # and the connections to the servers
        with torch.inference_mode(), model.inference_session(max_length=max_length) as session:
            swarm_decoder = (lambda h: session.step(parts.pre_blocks(h)), parts.embed, parts.head)
            _paired_decode([swarm_decoder, local_decoder()], prompt, 2)
        with torch.inference_mode(), model.inference_session(max_length=max_length) as session:
            swarm_decoder = (lambda h: session.step(parts.pre_blocks(h)), parts.embed, parts.head)
            (prefill, steps), (local_prefill, local_steps) = _paired_decode(
                [swarm_decoder, local_decoder()], prompt, args.new_tokens
            )
            remote = session.remote
            route = [f"{h.peer_id[-8:]}[{h.hop.start}:{h.hop.end}]" for h in remote.hops]
            decode_hops = list(remote.hop_times)[len(remote.hops) :]  # skip the prefill
            checks = remote.verifier.checks if remote.verifier is not None else 0
            pushed = remote.pushed_steps
    finally:
        model.shutdown()
    return {
        "route": route,
        "prefill": prefill,
        "steps": steps,
        "local_prefill": local_prefill,
        "local_steps": local_steps,
        "verify_checks": checks,
        "pushed_steps": pushed,
        # where the time goes: per hop, client-observed minus server-reported (network, p2pd, framing); with
        # push, client-observed is from sending the step to the first server until this hop's copy arrived
        "hop_transport_ms": _ms(statistics.median(t - s for _, t, s in decode_hops)),
        "hop_server_ms": _ms(statistics.median(s for _, _, s in decode_hops)),
    }


PUSH_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    from potluck.cli.sample_models import bench_model_path
    from potluck.models import LocalCausalLM, load_config

    model_path = args.model or bench_model_path()
    num_blocks = int(load_config(model_path).num_hidden_layers)
    spans = _even_spans(num_blocks, args.servers)
    torch.manual_seed(0)
    vocab = int(load_config(model_path).vocab_size)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens))
    max_length = args.prompt_tokens + args.new_tokens
    runs: dict[str, dict[str, Any]] = {}
    local = LocalCausalLM.from_pretrained(model_path)
    with link_swarm(args.link_delay_ms, args.link_mbps) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_server(model_path, s, wait=False, extra_args=["--throughput", "100"])
            for s in spans
            for _ in range(args.replicas)  # replicas > 1: verification has a second server to re-run steps on
        ]
        swarm.wait_ready(procs)
        for push in PUSH_MODES[args.push]:
            runs["on" if push else "off"] = _swarm_decode(
                args, swarm, model_path, prompt, max_length, push, local
            )
    delay = args.link_delay_ms / 1000
    by_mode = {}
    for mode, run in runs.items():
        step, local_step = statistics.median(run["steps"]), statistics.median(run["local_steps"])
        # the physical floor of a step: the links it must cross plus the local compute. Relaying through the
        # client crosses 2k one-way links for k servers; servers pushing to the next one cross k + 1.
        relay_floor = local_step + 2 * len(spans) * delay
        push_floor = local_step + (len(spans) + 1) * delay if len(spans) > 1 else relay_floor
        run.update(local_step=local_step, relay_floor=relay_floor, push_floor=push_floor)
        by_mode[mode] = {
            "step_ms": _ms(step),
            "step_mean_ms": _ms(statistics.mean(run["steps"])),
            "prefill_ms": _ms(run["prefill"]),
            "local_step_ms": _ms(local_step),  # timed in turns with this mode's steps
            "step_over_push_floor": round(step / push_floor, 3),
            "step_over_relay_floor": round(step / relay_floor, 3),
            "step_ratio": round(step / local_step, 3),  # over the local step
            "pushed_steps": run["pushed_steps"],  # steps that went by push (0 with push off)
            "verify_checks": run["verify_checks"],  # steps re-run on a second server
            "hop_transport_ms": run["hop_transport_ms"],
            "hop_server_ms": run["hop_server_ms"],
            "route": run["route"],
        }
    first = next(iter(by_mode))  # the flat keys below describe this mode (push on, unless --push off)
    main = runs[first]
    swarm_step, local_step = statistics.median(main["steps"]), main["local_step"]
    relay_floor, push_floor = main["relay_floor"], main["push_floor"]
    return {
        "bench": "inference",
        "model": model_path,
        "servers": len(spans),
        "spans": [list(s) for s in spans],
        "route": main["route"],
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "link_delay_ms": args.link_delay_ms,
        "link_mbps": args.link_mbps,
        "compression": args.compression,
        "direct_path": not args.no_direct,  # encrypted direct TCP (else libp2p only)
        "replicas": args.replicas,
        "verify_fraction": args.verify_fraction,
        "push": first,  # server-to-server push of the flat keys' run; "push_modes" has each mode
        "verify_checks": main["verify_checks"],
        "prefill_ms": _ms(main["prefill"]),
        "local_prefill_ms": _ms(main["local_prefill"]),
        "swarm_step_ms": _ms(swarm_step),
        "swarm_step_mean_ms": _ms(statistics.mean(main["steps"])),
        "local_step_ms": _ms(local_step),
        "local_step_mean_ms": _ms(statistics.mean(main["local_steps"])),
        "step_ratio": round(swarm_step / local_step, 3),
        "overhead_per_token_ms": _ms(swarm_step - local_step),
        "relay_floor_ms": _ms(relay_floor),
        "push_floor_ms": _ms(push_floor),
        "step_over_relay_floor": round(swarm_step / relay_floor, 3),
        "step_over_push_floor": round(swarm_step / push_floor, 3),
        "push_modes": by_mode,
        "hop_transport_ms": main["hop_transport_ms"],
        "hop_server_ms": main["hop_server_ms"],
        "torch_threads": torch.get_num_threads(),
    }


def bench_failover(args: argparse.Namespace) -> dict[str, Any]:
    from potluck import AutoDistributedModelForCausalLM
    from potluck.cli.sample_models import bench_model_path
    from potluck.client.generation import GenerationParams, generate_tokens
    from potluck.models import LocalCausalLM, load_config

    model_path = args.model or bench_model_path()
    config = load_config(model_path)
    n = int(config.num_hidden_layers)
    torch.manual_seed(0)
    prompt = torch.randint(0, int(config.vocab_size), (1, args.prompt_tokens))
    max_length = args.prompt_tokens + args.new_tokens
    token_times: list[float] = []
    kill_time: list[float] = []
    with tempfile.TemporaryDirectory(prefix="potluck-bench-") as logs, LocalSwarm(logs) as swarm:
        swarm.start_bootstrap()
        spans = [(0, n // 2), (n // 2, n), (n // 2, n)]
        procs = [swarm.start_server(model_path, s, wait=False) for s in spans]
        swarm.wait_ready(procs)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_path, initial_peers=swarm.initial_peers, load_tokenizer=False
        )
        try:
            with model.inference_session(max_length=max_length) as session:

                class Clock:
                    def put(self, value: Any) -> None:
                        token_times.append(time.perf_counter())
                        if len(token_times) == args.kill_after + 1:  # +1: the prompt comes first
                            victim = next(p for p in procs if p.peer_id == session.remote.hops[-1].peer_id)
                            kill_time.append(time.perf_counter())
                            swarm.kill(victim)

                    def end(self) -> None:
                        pass

                out = model.generate(prompt, max_new_tokens=args.new_tokens, streamer=Clock())
                failovers = session.remote.failovers
                new_peer = session.remote.hops[-1].peer_id
                replay_ms = next(
                    (srv * 1000 for peer, _, srv in session.remote.hop_times if peer == new_peer), 0.0
                )
        finally:
            model.shutdown()
        local = LocalCausalLM.from_pretrained(model_path)
        cache = local.new_cache(1, max_length)
        params = GenerationParams.from_kwargs(None, max_new_tokens=args.new_tokens)
        with torch.inference_mode():
            expected = generate_tokens(lambda ids: local.step(ids, cache)[:, -1], prompt, params)
    gaps = [b - a for a, b in zip(token_times[1:], token_times[2:], strict=False)]
    kill_index = args.kill_after  # token_times[kill_index] is when the victim died (just after that token)
    recovery = token_times[kill_index + 1] - kill_time[0]
    normal = statistics.median(gaps[: kill_index - 1] + gaps[kill_index + 1 :])
    replayed = args.prompt_tokens + args.kill_after
    return {
        "bench": "failover",
        "model": model_path,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "killed_after_tokens": args.kill_after,
        "failovers": failovers,
        "failure_to_next_token_ms": _ms(recovery),
        "replay_compute_ms": round(replay_ms, 3),  # the replacement's server time for the replayed tokens
        "failover_overhead_ms": round(
            recovery * 1000 - replay_ms, 3
        ),  # detection, re-route, open, rest of the step
        "normal_step_ms": _ms(normal),
        "replayed_tokens": replayed,
        "output_matches_local": bool(torch.equal(out, expected)),
    }


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """One training step = forward + backward to the input embeddings (what prompt tuning needs)."""
    from potluck import AutoDistributedModelForCausalLM
    from potluck.cli.sample_models import bench_model_path
    from potluck.models import LocalCausalLM, load_config

    model_path = args.model or bench_model_path()
    config = load_config(model_path)
    spans = _even_spans(int(config.num_hidden_layers), args.servers)
    torch.manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (args.batch, args.seq_len))

    def timed(model: Any) -> list[float]:
        times = []
        for _ in range(args.steps + 1):  # the first step warms up
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            t0 = time.perf_counter()
            loss = model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            times.append(time.perf_counter() - t0)
        return times[1:]

    with link_swarm(args.link_delay_ms, args.link_mbps) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_server(model_path, s, wait=False, extra_args=["--throughput", "100"])
            for s in spans
            for _ in range(args.replicas)  # replicas > 1: verification has a second server to re-run steps on
        ]
        swarm.wait_ready(procs)
        with AutoDistributedModelForCausalLM.from_pretrained(
            model_path, initial_peers=swarm.initial_peers, load_tokenizer=False
        ) as remote:
            swarm_times = timed(remote)
    local = LocalCausalLM.from_pretrained(model_path)
    local.requires_grad_(False)  # like the swarm: frozen weights, gradients only for the inputs
    local_times = timed(local)
    swarm_step, local_step = statistics.median(swarm_times), statistics.median(local_times)
    return {
        "bench": "train",
        "model": model_path,
        "servers": len(spans),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "swarm_step_ms": _ms(swarm_step),
        "local_step_ms": _ms(local_step),
        "step_ratio": round(swarm_step / local_step, 3),
        "torch_threads": torch.get_num_threads(),
    }
