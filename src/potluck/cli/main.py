"""``potluck`` command line: bootstrap, serve, generate, status, demo, bench, api, chat, dashboard."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

import configargparse

from potluck import __version__
from potluck.cli import api_commands
from potluck.cli.bench_speculative import add_bench_draft_arguments
from potluck.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, one_line, report
from potluck.cli.serve_options import ENV_PREFIX, add_serve_arguments

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(configargparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (the help text then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class PotluckParser(configargparse.ArgumentParser):
    """argparse with defaults in ``--help`` and usage errors as one line (exit 2); subcommands share it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _add_network(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        default=[],
        metavar="MADDR",
        help="multiaddrs of swarm peers, as a running peer prints them (/ip4/.../tcp/.../p2p/...)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface for this client's own p2pd")
    p.add_argument(
        "--swarm-key",
        default=None,
        metavar="FILE",
        help="private swarm: file with the secret all its peers share (default: an open swarm)",
    )


def add_draft_arguments(p: argparse.ArgumentParser) -> None:
    """Speculative decoding options (``generate``; ``chat`` and ``api`` take the same)."""
    p.add_argument(
        "--draft", default=None, metavar="MODEL",
        help="a small local model with the same tokenizer that proposes tokens the swarm checks in one step",
    )  # fmt: skip
    p.add_argument(
        "--num-assistant-tokens",
        type=int,
        default=4,
        help="draft tokens per round trip to start with (adapts)",
    )


def build_parser() -> PotluckParser:
    parser = PotluckParser(
        prog="potluck", description="Run and fine-tune large language models on a swarm of ordinary machines."
    )
    parser.add_argument("--version", action="version", version=f"potluck {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("POTLUCK_LOG_LEVEL", "INFO"),
        choices=LOG_LEVELS,
        type=str.upper,
        help="DEBUG also prints tracebacks of errors (env: POTLUCK_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("bootstrap", help="run a DHT-only peer that others join through")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    p.add_argument(
        "--identity",
        default=None,
        metavar="FILE",
        help="private key file for a fixed peer id (default: a new id)",
    )
    p.add_argument(
        "--swarm-key",
        default=None,
        metavar="FILE",
        help="private swarm: file with the secret all its peers share (default: an open swarm)",
    )

    p = sub.add_parser(
        "serve",
        help="serve a span of a model's blocks to the swarm",
        description="Serve a span of a model's blocks. Every option can also be set as an environment variable "
        f"({ENV_PREFIX}OPTION_NAME, e.g. {ENV_PREFIX}CACHE_TOKENS=8192) or in a --config file.",
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=[],
    )
    add_serve_arguments(p)

    p = sub.add_parser("generate", help="generate text with a model served by the swarm")
    p.add_argument(
        "model", help="HF hub id or local checkpoint directory (for the client parts and tokenizer)"
    )
    _add_network(p)
    p.add_argument("--prompt", required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="how many tokens to generate at most")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="with --do-sample: sampling temperature (default: 1.0)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="with --do-sample: keep the k likeliest tokens (default: 50; 0: all)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="with --do-sample: nucleus sampling mass (default: 1.0, off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="penalise repeated tokens, e.g. 1.2 (default: off)",
    )
    p.add_argument("--seed", type=int, default=None, help="with --do-sample: seed for reproducible sampling")
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: derived from MODEL)")
    p.add_argument(
        "--wait-for-servers",
        type=float,
        default=60.0,
        help="when blocks have no server, wait this long for one to join before failing (s)",
    )
    add_draft_arguments(p)

    p = sub.add_parser(
        "status",
        help="show the models a swarm serves, or which servers hold each block of one model",
        description="Without MODEL: list the models the swarm serves. With MODEL: each server of it (span, state, "
        "throughput, version, adapters, addresses; servers that stopped answering are shown as dead) and the "
        "blocks nobody serves. Exit code 1 if some block has no server.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, checkpoint directory or DHT name (default: list all models)",
    )
    _add_network(p)
    p.add_argument("--json", action="store_true", help="print JSON (full peer ids)")
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: derived from MODEL)")
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=3.0,
        help="a server that does not answer within this long is dead (s)",
    )

    p = sub.add_parser("finetune", help="train a soft prompt or LoRA adapters against a running swarm")
    p.add_argument("model", help="HF hub id or local checkpoint directory (for the client parts)")
    _add_network(p)
    p.add_argument("--mode", choices=["ptune", "deep_ptune", "lora"], default="lora", help="what to train")
    p.add_argument("--pre-seq-len", type=int, default=8, help="soft-prompt length (ptune, deep_ptune)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters (lora)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (lora)")
    p.add_argument("--lora-targets", nargs="*", default=[], help="projections to adapt (default: q and v)")
    p.add_argument(
        "--data", default=None, help="a text file, one example per line (default: a tiny built-in task)"
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches")
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
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    p.add_argument("--no-failover", action="store_true", help="skip killing a server mid-generation")

    api_commands.add_parsers(sub, _add_network)  # api, chat, dashboard

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("inference", help="decode step time through a loopback swarm vs local")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument(
        "--model", default=None, help="checkpoint (default: the standard bench model, made on demand)"
    )
    b.add_argument("--servers", type=int, default=2, help="number of servers splitting the blocks evenly")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    b.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    b.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="emulated one-way delay of every message each process sends, client and servers (ms)",
    )
    b.add_argument(
        "--link-mbps", type=float, default=0.0, help="emulated uplink rate per process (0: unlimited)"
    )
    b.add_argument(
        "--compression",
        default="none",
        choices=["none", "fp16", "bf16", "int8"],
        help="hidden-state compression",
    )
    b.add_argument("--no-direct", action="store_true", help="client uses libp2p only (no direct TCP path)")
    b.add_argument(
        "--push", default="both", choices=["on", "off", "both"],
        help="server-to-server push: measure with it on, off (client relays every hop), or both in one swarm",
    )  # fmt: skip
    b.add_argument("--replicas", type=int, default=1, help="servers per span (>1 lets verification run)")
    b.add_argument("--verify-fraction", type=float, default=0.05, help="client's verify_fraction")
    b.add_argument(
        "--quant", default="none", choices=["none", "int8", "nf4"],
        help="int8/nf4: a quantized swarm vs an unquantized one in the same run (sizes, step time, KL vs fp32)",
    )  # fmt: skip
    b.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype with --quant"
    )
    add_bench_draft_arguments(b)
    b = bench.add_parser("train", help="forward+backward step through a loopback swarm vs local")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--servers", type=int, default=2, help="number of servers splitting the blocks evenly")
    b.add_argument("--batch", type=int, default=4, help="sequences per step")
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    b.add_argument("--steps", type=int, default=3, help="measured steps")
    b = bench.add_parser("channel", help="cost of the encrypted direct path per hop vs plain TCP")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--tokens", type=int, default=1, help="tokens per message (1: a decode step)")
    b.add_argument("--hidden", type=int, default=1024, help="hidden size (default: the bench model's)")
    b.add_argument("--messages", type=int, default=2000, help="round trips to time")
    b = bench.add_parser("serve", help="many concurrent sessions through one swarm (server-side batching)")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--servers", type=int, default=2, help="number of servers splitting the blocks evenly")
    b.add_argument("--clients", type=int, default=8, help="concurrent sessions")
    b.add_argument("--processes", action="store_true", help="one client process per session")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of each session")
    b.add_argument("--new-tokens", type=int, default=64, help="tokens each session generates")
    b.add_argument(
        "--rounds", type=int, default=3,
        help="lone/concurrent phase pairs, alternated; the ratios are their medians (robust to a noisy machine)",
    )  # fmt: skip
    b.add_argument(
        "--no-prepack", action="store_true",
        help="servers and client keep fp32 CPU weights in PyTorch's layout (default: oneDNN's packed layout "
        "while calls batch rows, PyTorch's after 16 one-row calls)",
    )  # fmt: skip
    b.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="compute dtype of the servers and the client (auto: bfloat16 where the CPU multiplies it in "
        "hardware (AMX), as a serving deployment would, else float32)",
    )  # fmt: skip
    b = bench.add_parser("failover", help="time from a server's death to the next token")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--model", default=None, help="checkpoint (default: the standard bench model)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    b.add_argument("--new-tokens", type=int, default=40, help="tokens to generate")
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


def _log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` also after the subcommand (``potluck serve ... --log-level DEBUG``)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:  # noqa: SLF001
        for name, sub in getattr(action, "choices", {}).items():
            if name != "simulate":
                sub.add_argument(
                    "--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, type=str.upper,
                    help="DEBUG also prints tracebacks of errors (default: INFO)",
                )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    # Several potluck processes often share a machine's cores (a server beside a client, a local swarm); OpenMP
    # threads that spin-wait between parallel regions then steal cycles from whichever process is computing.
    # Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ctrl-C (SIGINT) must stop a command even when it was started with SIGINT ignored, as a non-interactive
    # shell does for its background jobs and some CI runners do for their whole tree; only in the main thread
    # (tests call main() from others).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":  # pure and network-free: hand the rest to the simulator's own parser
        from potluck.swarm.simulator import simulate_main

        return simulate_main(argv[1:])
    parser = build_parser()
    _log_level_everywhere(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    debug = args.log_level == "DEBUG"
    try:
        from potluck.cli import commands

        handler = {
            "bootstrap": commands.bootstrap,
            "serve": commands.serve,
            "generate": commands.generate,
            "status": commands.status,
            "demo": commands.demo,
            "finetune": commands.finetune,
            "bench": commands.bench,
            **api_commands.HANDLERS,
        }[args.command]
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("potluck: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        return report(e, debug=debug, prog=f"potluck {args.command}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python was still importing or parsing: no traceback either
        sys.exit(EXIT_INTERRUPTED)
