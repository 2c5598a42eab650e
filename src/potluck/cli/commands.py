"""Implementations of the ``potluck`` subcommands (argument parsing lives in ``main.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from potluck.cli.errors import CommandError, UsageError, warn

logger = logging.getLogger("potluck")


def bootstrap(args: argparse.Namespace) -> int:
    from potluck.cli.checks import check_port_free

    check_port_free(args.host, args.port, "--port")
    from potluck.swarm import aio
    from potluck.swarm.transport import NodeOptions, SwarmNode

    async def run() -> None:
        node = await SwarmNode.create(
            NodeOptions(
                host=args.host, port=args.port, identity_path=args.identity, swarm_key_path=args.swarm_key
            )
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
            ready = {"peer_id": node.peer_id, "maddrs": maddrs, "sockets": node.socket_paths()}
            print("POTLUCK_READY " + json.dumps(ready), flush=True)
            await stop.wait()
        finally:
            await node.shutdown()
            logger.info("bootstrap peer stopped")

    aio.run(run())
    return 0


def _resolve_device(requested: str | None) -> str:
    if requested == "cpu":
        return requested  # no torch import needed to know that
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available here; pass --device cpu")
    try:
        torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    return requested


def _model_depth(model: str, args: argparse.Namespace) -> int:
    """Number of blocks, from the cached resolved config (no transformers import once a config has been seen)."""
    from potluck.models.config_view import load_config_view

    return int(load_config_view(model, revision=args.revision, token=args.token).num_hidden_layers)


def _check_span_fits(args: argparse.Namespace, model: str) -> None:
    """--blocks / --num-blocks against the model's depth, before any network or weights."""
    num_blocks = _model_depth(model, args)
    if args.blocks is not None and args.blocks[1] > num_blocks:
        start, end = args.blocks
        raise UsageError(
            f"--blocks {start}:{end} is outside the model's {num_blocks} blocks: pass a range within 0:{num_blocks}"
        )
    if args.num_blocks is not None and args.num_blocks > num_blocks:
        raise UsageError(f"--num-blocks {args.num_blocks} exceeds the model's {num_blocks} blocks")


def serve(args: argparse.Namespace) -> int:
    from potluck.cli.checks import check_maddrs, check_model, check_peers_reachable, check_port_free
    from potluck.cli.serve_options import check_serve_flags, server_config_from_args

    # Order: what costs nothing first (flags, paths), then what imports hivemind/torch, then the network.
    check_serve_flags(args)
    model = check_model(args.model, revision=args.revision, token=args.token)
    check_maddrs("--initial-peers", args.initial_peers, need_peer_id=True)
    check_maddrs("--announce-maddrs", args.announce_maddrs, need_peer_id=False)
    check_port_free(args.host, args.port, "--port")
    if not args.no_direct:
        check_port_free(args.host, args.direct_port, "--direct-port")
    fp16_on_cpu = (
        "--dtype float16 on CPU is slow (most CPUs have no fp16 matmul kernels): prefer float32 or bfloat16"
    )
    if args.dtype == "float16" and args.device == "cpu":
        warn(fp16_on_cpu)  # now, before anything else can fail
    _check_span_fits(args, model)
    check_peers_reachable(args.initial_peers)
    device = _resolve_device(args.device)  # imports torch (seconds) unless --device cpu
    if args.dtype == "float16" and device == "cpu" and args.device != "cpu":
        warn(fp16_on_cpu)
    config = server_config_from_args(args, model=model, device=device)

    from potluck.server.server import run_server

    return run_server(config)


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"initial_peers": tuple(args.initial_peers), "host": args.host}
    if getattr(args, "swarm_key", None):
        kwargs["swarm_key_file"] = args.swarm_key
    if getattr(args, "model_prefix", None):
        kwargs["model_prefix"] = args.model_prefix
    return kwargs


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s sampling flags as ``model.generate`` keywords; flags left out keep the HF defaults.

    Raises ``UsageError`` for values that can never work; warns (one line each) about flags that have no effect.
    """
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    kwargs: dict[str, Any] = {"do_sample": bool(args.do_sample)}
    given = {
        name: getattr(args, name)
        for name in ("temperature", "top_k", "top_p", "seed")
        if getattr(args, name) is not None
    }
    if not args.do_sample:
        for name in given:
            flag = "--" + name.replace("_", "-")
            warn(f"{flag} has no effect without --do-sample (decoding is greedy); add --do-sample to sample")
        given = {}
    if "temperature" in given and given["temperature"] <= 0:
        raise UsageError(
            f"--temperature must be > 0, got {given['temperature']} (for greedy decoding drop --do-sample)"
        )
    if "top_p" in given and not 0 < given["top_p"] <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {given['top_p']}")
    if "top_k" in given and given["top_k"] < 0:
        raise UsageError(f"--top-k must be >= 0, got {given['top_k']}")
    given.pop("seed", None)
    kwargs.update(given)
    if args.repetition_penalty is not None:
        if args.repetition_penalty <= 0:
            raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


def _check_client_args(args: argparse.Namespace) -> str:
    from potluck.cli.checks import check_maddrs, check_model, check_peers_reachable

    model = check_model(args.model)
    check_maddrs("--initial-peers", args.initial_peers, need_peer_id=True)
    check_peers_reachable(args.initial_peers)
    return model


def draft_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` keywords for ``--draft`` (speculative decoding): the draft is loaded once, here."""
    if not getattr(args, "draft", None):
        return {}
    from potluck.client.speculative import SpeculationStats, load_draft

    return {
        "assistant_model": load_draft(args.draft),
        "num_assistant_tokens": args.num_assistant_tokens,
        "speculation_stats": SpeculationStats(),
    }


def generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UsageError('--prompt is empty: pass the text to continue, e.g. --prompt "Once upon a time"')
    sampling = sampling_kwargs(args)
    if args.wait_for_servers < 0:
        raise UsageError(f"--wait-for-servers must be >= 0, got {args.wait_for_servers}")
    model_path = _check_client_args(args)

    import torch
    from transformers import TextStreamer

    from potluck import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, wait_for_servers=args.wait_for_servers, **_client_kwargs(args)
    )
    try:
        if model.tokenizer is None:
            raise UsageError(f"{args.model} has no tokenizer: use the Python API with token ids")
        input_ids = model.tokenizer(args.prompt, return_tensors="pt").input_ids
        if args.seed is not None:
            torch.manual_seed(args.seed)
        streamer = TextStreamer(model.tokenizer)
        logger.info("joined the swarm; generating %d tokens", args.max_new_tokens)
        speculation = draft_kwargs(args)
        t0 = time.perf_counter()
        try:
            out = model.generate(
                input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling, **speculation
            )
        except Exception as e:
            raise _explain_missing_blocks(e, model.view.model_prefix, args.wait_for_servers) from e
        dt = time.perf_counter() - t0
        new = out.shape[1] - input_ids.shape[1]
        print(f"\n[{new} tokens in {dt:.2f}s, {new / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
        if speculation:
            st = speculation["speculation_stats"]
            print(
                f"[draft: {st.tokens_per_round:.2f} tokens per round trip, "
                f"{st.acceptance_rate:.0%} of proposals accepted]",
                file=sys.stderr,
            )
    finally:
        model.shutdown()
    return 0


def _explain_missing_blocks(error: Exception, prefix: str, waited: float) -> Exception:
    """A MissingBlocksError anywhere in the chain becomes: which blocks, how long we waited, what to do."""
    from potluck.swarm.routing import MissingBlocksError, format_block_ranges

    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, MissingBlocksError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return error
    return CommandError(
        f"no server serves blocks {format_block_ranges(seen.missing)} of {prefix} (waited {waited:g}s for one "
        f"to join): start one with `potluck serve MODEL --blocks A:B --initial-peers ...`, or raise --wait-for-servers"
    )


def status(args: argparse.Namespace) -> int:
    from potluck.cli.checks import check_maddrs, check_model, check_peers_reachable, looks_like_local_path

    if args.model is not None and (looks_like_local_path(args.model) or os.path.isdir(args.model)):
        check_model(args.model)  # a DHT name or hub id needs no download: the swarm says how deep it is
    check_maddrs("--initial-peers", args.initial_peers, need_peer_id=True)
    check_peers_reachable(args.initial_peers)
    from potluck.cli.status import gather_models, gather_status, render_models, render_status

    if args.model is None and args.model_prefix is None:
        models = gather_models(tuple(args.initial_peers), args.host, swarm_key=args.swarm_key)
        print(json.dumps(models, indent=2) if args.json else render_models(models))
        return 0
    report = gather_status(
        args.model,
        tuple(args.initial_peers),
        args.model_prefix,
        args.host,
        probe_timeout=args.probe_timeout,
        swarm_key=args.swarm_key,
    )
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0 if not report["missing_blocks"] else 1


def finetune(args: argparse.Namespace) -> int:
    args.model = _check_client_args(args)
    from potluck.cli.finetune import run_finetune

    return run_finetune(args)


def demo(args: argparse.Namespace) -> int:
    from potluck.cli.demo import run_demo

    return run_demo(args)


def bench(args: argparse.Namespace) -> int:
    from potluck.cli import bench as bench_mod
    from potluck.cli.bench_channel import bench_channel
    from potluck.cli.bench_serve import bench_serve
    from potluck.cli.bench_speculative import bench_inference_with_draft, wants_draft
    from potluck.server.cpu_load import read_cpu_ticks, steal_share

    runners = {
        "inference": bench_inference_with_draft if wants_draft(args) else bench_mod.bench_inference,
        "failover": bench_mod.bench_failover,
        "train": bench_mod.bench_train,
        "channel": bench_channel,
        "serve": bench_serve,
    }
    if args.bench == "inference" and getattr(args, "quant", "none") != "none":
        from potluck.cli.bench_quant import bench_inference_quant

        runners["inference"] = bench_inference_quant
    before = read_cpu_ticks()
    result = runners[args.bench](args)
    steal = steal_share(before, read_cpu_ticks())
    if steal is not None:
        # share of the cores' time a hypervisor gave to other guests during the run: figures taken at 0.3 come
        # from a machine a third slower than the same run at 0.0
        result["cpu_steal"] = round(steal, 3)
    text = json.dumps(result, indent=None if args.json else 2)
    print(text)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
