"""Implementations of the ``potluck`` subcommands (argument parsing lives in ``main.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any

logger = logging.getLogger("potluck")


def bootstrap(args: argparse.Namespace) -> int:
    from potluck.swarm import aio
    from potluck.swarm.transport import NodeOptions, SwarmNode

    async def run() -> None:
        node = await SwarmNode.create(
            NodeOptions(host=args.host, port=args.port, identity_path=args.identity)
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            maddrs = await node.visible_maddrs()
            logger.info("bootstrap peer %s is up; others join with:", node.peer_id)
            for m in maddrs:
                logger.info("  --initial-peers %s", m)
            print("POTLUCK_READY " + json.dumps({"peer_id": node.peer_id, "maddrs": maddrs}), flush=True)
            await stop.wait()
        finally:
            await node.shutdown()
            logger.info("bootstrap peer stopped")

    aio.run(run())
    return 0


def serve(args: argparse.Namespace) -> int:
    import torch

    from potluck.server.config import ServerConfig
    from potluck.server.server import run_server
    from potluck.swarm.transport import NodeOptions

    if args.blocks is None and args.num_blocks is None:
        print("error: pass --blocks A:B (or --num-blocks N for automatic placement)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = ServerConfig(
        model=args.model,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        node=NodeOptions(
            initial_peers=tuple(args.initial_peers),
            host=args.host or "0.0.0.0",
            port=args.port,
            announce_maddrs=tuple(args.announce_maddrs),
            identity_path=args.identity,
        ),
        model_prefix=args.model_prefix,
        device=device,
        dtype=args.dtype,
        revision=args.revision,
        token=args.token,
        public_name=args.public_name,
        cache_tokens=args.cache_tokens,
        max_inference_length=args.max_inference_length,
        max_batch_tokens=args.max_batch_tokens,
        step_timeout=args.step_timeout,
        update_period=args.update_period,
        expiration=max(2 * args.update_period, 3.0),
        throughput=args.throughput,
        bandwidth_mbps=args.bandwidth_mbps,
        direct_port=None if args.no_direct else args.direct_port,
        balance_quality=args.balance_quality,
        balance_check_period=args.balance_check_period,
        start_delay_max=args.start_delay_max,
        adapters=tuple(args.adapters),
        peer_cache_tokens=args.peer_cache_tokens,
        step_token_budget=args.step_token_budget,
    )
    return run_server(config)


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"initial_peers": tuple(args.initial_peers)}
    if args.host:
        kwargs["host"] = args.host
    if getattr(args, "model_prefix", None):
        kwargs["model_prefix"] = args.model_prefix
    return kwargs


def generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from potluck import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, **_client_kwargs(args))
    try:
        if model.tokenizer is None:
            print(
                "error: the checkpoint has no tokenizer; use the Python API with token ids", file=sys.stderr
            )
            return 2
        input_ids = model.tokenizer(args.prompt, return_tensors="pt").input_ids
        if args.seed is not None:
            torch.manual_seed(args.seed)
        sampling: dict[str, Any] = {"do_sample": args.do_sample}
        if args.do_sample:
            sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.repetition_penalty:
            sampling["repetition_penalty"] = args.repetition_penalty
        streamer = TextStreamer(model.tokenizer)
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
        dt = time.perf_counter() - t0
        new = out.shape[1] - input_ids.shape[1]
        print(f"\n[{new} tokens in {dt:.2f}s, {new / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    finally:
        model.shutdown()
    return 0


def status(args: argparse.Namespace) -> int:
    from potluck.cli.status import gather_status, render_status

    report = gather_status(args.model, tuple(args.initial_peers), args.model_prefix, args.host)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_status(report))
    return 0 if not report["missing_blocks"] else 1


def finetune(args: argparse.Namespace) -> int:
    from potluck.cli.finetune import run_finetune

    return run_finetune(args)


def demo(args: argparse.Namespace) -> int:
    from potluck.cli.demo import run_demo

    return run_demo(args)


def bench(args: argparse.Namespace) -> int:
    from potluck.cli import bench as bench_mod
    from potluck.cli.bench_serve import bench_serve

    runners = {
        "inference": bench_mod.bench_inference,
        "failover": bench_mod.bench_failover,
        "train": bench_mod.bench_train,
        "serve": bench_serve,
    }
    result = runners[args.bench](args)
    text = json.dumps(result, indent=None if args.json else 2)
    print(text)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
