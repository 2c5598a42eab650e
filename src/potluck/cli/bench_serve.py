"""``potluck bench serve``: many concurrent sessions through one loopback swarm (server-side batching).

One swarm, two phases on the same servers: a lone session, then ``--clients`` sessions started together (each
with its own random prompt), either as threads of this process or as ``--processes`` (one client process per
session). Each session generates greedily; we time every decode step (embeddings + swarm + LM head).

The two phases alternate ``--rounds`` times and the ratios reported are the medians of each round's ratio: on a
shared VM the speed of the cores drifts by tens of percent within a minute (``cpu_steal`` says how much time the
hypervisor took), and a lone phase measured at another moment than its concurrent phase would compare two
machines.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from typing import Any

import psutil
import torch

from potluck.cli.bench import _even_spans, _ms, alternated_rounds, median_round
from potluck.cli.errors import UsageError
from potluck.cli.local_swarm import LocalSwarm
from potluck.server.cpu_load import read_cpu_ticks, steal_share


def _session_run(model: Any, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[float]]:
    """One greedy session; returns (start, end, decode-step seconds).

    The server-reported time of each decode hop (queue + batched compute) goes to ``_SERVER_TIMES``.
    """
    parts = model.client
    start = time.perf_counter()
    steps: list[float] = []
    with torch.inference_mode(), model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        hidden = session.step(parts.pre_blocks(parts.embed(prompt)))  # [1, T, H]
        logits = parts.head(hidden[:, -1:])[:, -1]  # [1, V]: only the last position, as generate() does
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            next_id = logits.argmax(-1, keepdim=True)  # [1, 1]
            logits = parts.head(session.step(parts.pre_blocks(parts.embed(next_id))))[:, -1]
            steps.append(time.perf_counter() - t0)
        hops = len(session.remote.hops)
        _SERVER_TIMES.extend(srv for _, _, srv in list(session.remote.hop_times)[hops:])  # skip the prefill
    return start, time.perf_counter(), steps


_SERVER_TIMES: list[float] = []  # server-side seconds per decode hop, filled by the sessions of this process


def _prompts(vocab: int, clients: int, tokens: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, tokens), generator=gen) for _ in range(clients + 1)]


def _worker(
    model_path: str,
    peers: list[str],
    prompt: list[int],
    new_tokens: int,
    barrier: Any,
    results: Any,
    index: int,
    prepack: bool,
    dtype: str,
) -> None:
    """A client process with one session (``--processes``)."""
    from potluck import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, load_tokenizer=False, prepack_head=prepack, torch_dtype=dtype
    )
    try:
        barrier.wait()
        start_wall = time.time()
        start, end, steps = _session_run(model, torch.tensor([prompt]), new_tokens)
        results.put((index, start_wall, start_wall + (end - start), steps))
    finally:
        model.shutdown()


def _summary(spans: list[tuple[float, float]], steps: list[list[float]], new_tokens: int) -> dict[str, Any]:
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    all_steps = sorted(t for per in steps for t in per)
    server = sorted(_SERVER_TIMES)
    _SERVER_TIMES.clear()
    p50s = [statistics.median(per) for per in steps]
    return {
        "sessions": len(steps),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(len(steps) * new_tokens / wall, 2),
        "step_p50_ms": _ms(statistics.median(all_steps)),
        "step_p95_ms": _ms(all_steps[min(len(all_steps) - 1, int(0.95 * len(all_steps)))]),
        "worst_session_step_p50_ms": _ms(max(p50s)),
        # per hop, as the servers report it (queue + compute of the batch the step rode in); empty with
        # --processes, whose sessions live in other processes
        "server_hop_p50_ms": _ms(statistics.median(server)) if server else None,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Usage:
    """CPU time of this process and every process it started (servers, p2pd daemons, client workers), the
    servers' batch sizes (from their metrics pages) and this process's LM-head batch sizes, over a phase.

    This machine runs the clients and all servers on the same cores; ``cpu_busy`` near 1.0 means the phase was
    limited by the cores, not by waiting."""

    def __init__(self, metrics_ports: list[int], head: Any):
        self.ports = metrics_ports
        self.head = head  # the client's RowBatcher (ClientParts.shared_head)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> _Usage:
        self.cpu0, self.batches0, self.t0 = _tree_cpu_seconds(), self._batches(), time.perf_counter()
        self.ticks0 = read_cpu_ticks()
        self.head0 = (self.head.calls, self.head.rows)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        cpu = _tree_cpu_seconds() - self.cpu0
        count, total, seconds, batch_cpu = (
            b - a for a, b in zip(self.batches0, self._batches(), strict=True)
        )
        head_calls, head_rows = self.head.calls - self.head0[0], self.head.rows - self.head0[1]
        steal = steal_share(self.ticks0, read_cpu_ticks())
        self.result = {
            "cpu_busy": round(cpu / (wall * (os.cpu_count() or 1)), 3),  # fraction of all cores' time in use
            # fraction of all cores' time a hypervisor gave to other guests (None: not Linux)
            "cpu_steal": round(steal, 3) if steal is not None else None,
            "server_batches": int(count),
            "sessions_per_server_batch": round(total / count, 2) if count else None,
            "server_batch_ms": _ms(seconds / count) if count else None,  # mean compute time of one batch
            # its CPU time (the rest of server_batch_ms: waiting for a core)
            "server_batch_cpu_ms": _ms(batch_cpu / count) if count else None,
            # rows per LM-head matmul in this process (concurrent sessions' heads run as one; None with
            # --processes, whose sessions live in other processes)
            "client_rows_per_head_call": round(head_rows / head_calls, 2) if head_calls else None,
        }

    def _batches(self) -> tuple[float, float, float, float]:
        """(batches, sessions in them, their compute seconds, CPU seconds), summed over the servers' metrics."""
        count = total = seconds = cpu = 0.0
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                for line in page.read().decode().splitlines():
                    if line.startswith("potluck_server_batch_sessions_count"):
                        count += float(line.split()[-1])
                    elif line.startswith("potluck_server_batch_sessions_sum"):
                        total += float(line.split()[-1])
                    elif line.startswith("potluck_server_batch_seconds_sum"):
                        seconds += float(line.split()[-1])
                    elif line.startswith("potluck_server_batch_cpu_seconds_sum"):
                        cpu += float(line.split()[-1])
        return count, total, seconds, cpu


def _tree_cpu_seconds() -> float:
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            # children_*: descendants that already exited and were reaped (e.g. --processes client workers)
            total += times.user + times.system + times.children_user + times.children_system
    return total


def bench_dtype(name: str) -> str:
    """The compute dtype ``--dtype name`` stands for. ``auto``: bfloat16 on CPUs whose AMX units multiply it
    (Intel Xeon since Sapphire Rapids), else float32. There a decode batch of 8 rows costs about what one row
    costs (the step streams the weights, half as many bytes as fp32's), while fp32's matmuls cost ~1.8x more for
    8 rows than for one (measured on 4 blocks of the bench model, one thread: 24 ms for one row, 44 ms for 8;
    bf16: 26 and 28 ms). A serving deployment computes in bf16, as on GPUs."""
    if name != "auto":
        return name
    return "bfloat16" if torch.cpu.get_capabilities().get("amx_bf16") else "float32"


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from potluck import AutoDistributedModelForCausalLM
    from potluck.cli.sample_models import bench_model_path
    from potluck.models import load_config

    if args.rounds < 1 or args.clients < 1:
        raise UsageError(f"--rounds and --clients must be at least 1, got {args.rounds} and {args.clients}")
    model_path = args.model or bench_model_path()
    config = load_config(model_path)
    dtype = bench_dtype(args.dtype)
    spans = _even_spans(int(config.num_hidden_layers), args.servers)
    prompts = _prompts(int(config.vocab_size), args.clients, args.prompt_tokens)
    ports = [_free_port() for _ in spans]
    with tempfile.TemporaryDirectory(prefix="potluck-bench-") as logs, LocalSwarm(logs) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_server(
                model_path,
                s,
                wait=False,
                extra_args=[
                    *["--throughput", "100", "--metrics-port", str(port), "--dtype", dtype],
                    *(["--no-prepack"] if args.no_prepack else []),
                ],
            )
            for s, port in zip(spans, ports, strict=True)
        ]
        swarm.wait_ready(procs)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_path,
            initial_peers=swarm.initial_peers,
            load_tokenizer=False,
            prepack_head=not args.no_prepack,
            torch_dtype=dtype,
        )
        try:
            _session_run(model, prompts[0][:, :8], 4)  # warm-up: routes, connections
            _SERVER_TIMES.clear()
            rounds = alternated_rounds(
                args,
                f"1 session, then {args.clients}",
                lambda: _round(args, model, model_path, swarm.initial_peers, ports, prompts, dtype),
            )
        finally:
            model.shutdown()
    middle = median_round(rounds, "tokens_per_s_ratio")
    return {
        "bench": "serve",
        "model": model_path,
        "servers": len(spans),
        "clients": args.clients,
        "client_processes": args.clients if args.processes else 1,
        "prompt_tokens": args.prompt_tokens,
        "dtype": dtype,  # servers' and client's compute dtype
        "prepacked": not args.no_prepack,
        "new_tokens": args.new_tokens,
        "rounds": len(rounds),
        # the round whose tokens/s ratio is the median one
        "single": middle["single"],
        "concurrent": middle["concurrent"],
        # medians over the rounds of each round's ratio
        **{
            key: round(statistics.median(r[key] for r in rounds), 2)
            for key in ("tokens_per_s_ratio", "step_p50_ratio", "worst_session_p50_ratio")
        },
        "per_round": [
            {key: r[key] for key in ("tokens_per_s_ratio", "step_p50_ratio", "worst_session_p50_ratio")}
            | {
                "single_tokens_per_s": r["single"]["tokens_per_s"],
                "concurrent_tokens_per_s": r["concurrent"]["tokens_per_s"],
            }
            for r in rounds
        ],
    }


def _round(
    args: argparse.Namespace,
    model: Any,
    model_path: str,
    peers: list[str],
    ports: list[int],
    prompts: list[torch.Tensor],
    dtype: str,
) -> dict[str, Any]:
    """One lone phase, then one concurrent phase, on the same swarm."""
    with _Usage(ports, model.client.shared_head) as usage:
        start, end, lone_steps = _session_run(model, prompts[0], args.new_tokens)
    single = {**_summary([(start, end)], [lone_steps], args.new_tokens), **usage.result}
    with _Usage(ports, model.client.shared_head) as usage:
        if args.processes:
            many = _many_processes(
                model_path, peers, prompts[1:], args.new_tokens, not args.no_prepack, dtype
            )
        else:
            many = _many_threads(model, prompts[1:], args.new_tokens)
    many.update(usage.result)
    return {
        "single": single,
        "concurrent": many,
        "tokens_per_s_ratio": round(many["tokens_per_s"] / single["tokens_per_s"], 2),
        "step_p50_ratio": round(many["step_p50_ms"] / single["step_p50_ms"], 2),
        "worst_session_p50_ratio": round(many["worst_session_step_p50_ms"] / single["step_p50_ms"], 2),
    }


def _many_threads(model: Any, prompts: list[torch.Tensor], new_tokens: int) -> dict[str, Any]:
    barrier = threading.Barrier(len(prompts))
    results: list[tuple[float, float, list[float]] | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = _session_run(model, prompts[i], new_tokens)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    return _summary([(s, e) for s, e, _ in done], [steps for _, _, steps in done], new_tokens)


def _many_processes(
    model_path: str,
    peers: list[str],
    prompts: list[torch.Tensor],
    new_tokens: int,
    prepack: bool,
    dtype: str,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(prompts))
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(model_path, peers, prompts[i][0].tolist(), new_tokens, barrier, results, i, prepack, dtype),
        )
        for i in range(len(prompts))
    ]
    for w in workers:
        w.start()
    try:
        got = [results.get(timeout=600) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    return _summary([(s, e) for _, s, e, _ in got], [steps for *_, steps in got], new_tokens)
