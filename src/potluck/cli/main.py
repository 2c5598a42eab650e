"""``potluck`` command line: bootstrap, serve, generate, status, demo, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from potluck import __version__


def _blocks(text: str) -> tuple[int, int]:
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:4), got {text!r}") from None


def _add_network(p: argparse.ArgumentParser, *, peers_required: bool) -> None:
    p.add_argument(
        "--initial-peers",
        nargs="+",
        required=peers_required,
        default=[],
        metavar="MADDR",
        help="multiaddrs of swarm peers, as printed by `potluck bootstrap` (/ip4/.../tcp/.../p2p/...)",
    )
    p.add_argument(
        "--host", default=None, help="interface to listen on (default 0.0.0.0; 127.0.0.1 for loopback)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potluck", description="Run and fine-tune large language models on a swarm of ordinary machines."
    )
    parser.add_argument("--version", action="version", version=f"potluck {__version__}")
    parser.add_argument(
        "--log-level", default=os.environ.get("POTLUCK_LOG_LEVEL", "INFO"), help="DEBUG, INFO, ..."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("bootstrap", help="run a DHT-only peer that others join through")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    p.add_argument("--identity", default=None, metavar="FILE", help="private key file for a fixed peer id")

    p = sub.add_parser("serve", help="serve a span of a model's blocks to the swarm")
    p.add_argument("model", help="HF hub name or local checkpoint directory (safetensors)")
    p.add_argument("--blocks", type=_blocks, default=None, metavar="A:B", help="serve blocks A..B-1")
    p.add_argument(
        "--num-blocks", type=int, default=None, help="serve this many blocks, placed automatically"
    )
    _add_network(p, peers_required=True)
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: any free port)")
    p.add_argument(
        "--announce-maddrs", nargs="*", default=[], help="addresses others should dial, if different"
    )
    p.add_argument("--identity", default=None, metavar="FILE", help="private key file for a fixed peer id")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--public-name", default=None, help="a name shown by `potluck status`")
    p.add_argument("--cache-tokens", type=int, default=16384, help="KV-cache budget in batch*tokens")
    p.add_argument("--max-inference-length", type=int, default=8192, help="largest max_length of one session")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="largest batch*tokens of one request")
    p.add_argument(
        "--peer-cache-tokens",
        type=int,
        default=None,
        help="cache one client peer may hold (default: half the budget)",
    )
    p.add_argument(
        "--step-token-budget", type=int, default=256, help="rows*tokens of one batched step (prefill chunks)"
    )
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: from MODEL)")
    p.add_argument("--step-timeout", type=float, default=300.0, help="close sessions idle this long (s)")
    p.add_argument("--update-period", type=float, default=15.0, help="re-announce records this often (s)")
    p.add_argument(
        "--throughput", type=float, default=None, help="announced tokens/s per block (default: measure)"
    )
    p.add_argument("--adapters", nargs="*", default=[], metavar="DIR", help="PEFT LoRA adapters to preload")
    p.add_argument(
        "--direct-port", type=int, default=0, help="port of the plain-TCP data path (0: any free port)"
    )
    p.add_argument(
        "--no-direct", action="store_true", help="serve over libp2p only (encrypted; slower on busy hosts)"
    )
    p.add_argument(
        "--bandwidth-mbps", type=float, default=100.0, help="network bandwidth, for the announced throughput"
    )
    p.add_argument(
        "--balance-quality", type=float, default=0.75,
        help="with automatic placement, move when the swarm's throughput would grow past 1/this (0: never move)",
    )  # fmt: skip
    p.add_argument(
        "--balance-check-period", type=float, default=60.0, help="seconds between rebalancing checks"
    )
    p.add_argument(
        "--start-delay-max", type=float, default=5.0, help="random delay before choosing blocks (s)"
    )
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--token", default=None, help="hub token for gated models")

    p = sub.add_parser("generate", help="generate text with a model served by the swarm")
    p.add_argument("model", help="HF hub name or local checkpoint directory (for the client parts)")
    _add_network(p, peers_required=True)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: from MODEL)")

    p = sub.add_parser("status", help="show which servers hold each block")
    p.add_argument("model", help="HF hub name or local checkpoint directory")
    _add_network(p, peers_required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: from MODEL)")

    p = sub.add_parser("finetune", help="train a soft prompt or LoRA adapters against a running swarm")
    p.add_argument("model", help="HF hub name or local checkpoint directory (for the client parts)")
    _add_network(p, peers_required=True)
    p.add_argument("--mode", choices=["ptune", "deep_ptune", "lora"], default="lora", help="what to train")
    p.add_argument("--pre-seq-len", type=int, default=8, help="soft-prompt length (ptune, deep_ptune)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", nargs="*", default=[], help="projections to adapt (default: q and v)")
    p.add_argument(
        "--data", default=None, help="a text file, one example per line (default: a tiny built-in task)"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, metavar="DIR", help="write the trained adapters / prompts here")
    p.add_argument("--json", action="store_true", help="also print the losses as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "simulate", help="simulate load balancing of many servers (prints JSON with --json)", add_help=False
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="see `potluck simulate --help`")

    p = sub.add_parser("demo", help="start a local swarm, generate through it, survive a failure, stop it")
    p.add_argument(
        "--model", default=None, help="checkpoint to serve (default: a small Llama made on first run)"
    )
    p.add_argument("--prompt", default="The swarm is", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-failover", action="store_true", help="skip killing a server mid-generation")

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("inference", help="decode step time through a loopback swarm vs local")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument(
        "--model", default=None, help="checkpoint (default: the standard bench model, made on demand)"
    )
    b.add_argument("--servers", type=int, default=2, help="number of servers splitting the blocks evenly")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--hop-delay-ms", type=float, default=0.0, help="emulated one-way delay per hop (ms)")
    b.add_argument("--compression", default="none", choices=["none", "fp16", "bf16", "int8"])
    b = bench.add_parser("train", help="forward+backward step through a loopback swarm vs local")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--servers", type=int, default=2)
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--steps", type=int, default=3)
    b = bench.add_parser("serve", help="many concurrent sessions through one swarm (server-side batching)")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--servers", type=int, default=2)
    b.add_argument("--clients", type=int, default=8, help="concurrent sessions")
    b.add_argument("--processes", action="store_true", help="one client process per session")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b = bench.add_parser("failover", help="time from a server's death to the next token")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=40)
    b.add_argument("--kill-after", type=int, default=10, help="kill a server after this many new tokens")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("hivemind", "asyncio", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    # Several potluck processes often share a machine's cores (a server beside a client, a local swarm); OpenMP
    # threads that spin-wait between parallel regions then steal cycles from whichever process is computing.
    # Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":  # pure and network-free: hand the rest to the simulator's own parser
        from potluck.swarm.simulator import simulate_main

        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    from potluck.cli import commands

    handler = {
        "bootstrap": commands.bootstrap,
        "serve": commands.serve,
        "generate": commands.generate,
        "status": commands.status,
        "demo": commands.demo,
        "finetune": commands.finetune,
        "bench": commands.bench,
    }[args.command]
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
