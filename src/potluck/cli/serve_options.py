"""``potluck serve``'s options, one per field of ``ServerConfig`` / ``NodeOptions``, and the mapping onto them.

Every option can also come from an environment variable (``--cache-tokens`` <- ``POTLUCK_CACHE_TOKENS``) or a
config file (``--config FILE``, lines like ``cache-tokens = 8192``, lists as ``initial-peers = [A, B]``), through
ConfigArgParse. Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import argparse
from typing import Any

from potluck.cli.errors import UsageError
from potluck.server.config import DTYPE_CHOICES, ServerConfig
from potluck.swarm.node_options import NodeOptions

ENV_PREFIX = "POTLUCK_"
COMPRESSIONS = ("none", "fp16", "bf16", "int8")
_S = ServerConfig  # its class attributes are the field defaults
_N = NodeOptions

# ServerConfig / NodeOptions fields that the command line spells differently (all others: --field-name).
FLAG_FOR_FIELD = {
    "node": None,
    "identity_path": "identity",
    "client_mode": None,
    "swarm_key_path": "swarm_key",
    "push": "no_push",
    "prepack": "no_prepack",
}


def parse_blocks(text: str) -> tuple[int, int]:
    """``START:END`` with 0 <= START < END (END exclusive)."""
    try:
        a, b = text.split(":")
        start, end = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:4), got {text!r}") from None
    if start < 0 or end <= start:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {'reversed' if end < start else 'empty' if end == start else 'negative'}: "
            "pass START:END with 0 <= START < END, e.g. 0:4 for blocks 0, 1, 2 and 3"
        )
    return start, end


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("model", help="HF hub id (org/name) or local checkpoint directory (safetensors)")
    add(
        "--config",
        is_config_file=True,
        metavar="FILE",
        help="read options from FILE (lines `option-name = value`; lists as [a, b])",
    )
    where = p.add_argument_group(
        "which blocks (neither flag: as many as fit in memory, placed automatically)"
    )
    where.add_argument(
        "--blocks",
        type=parse_blocks,
        default=None,
        metavar="A:B",
        help="serve blocks A..B-1 (fixed placement)",
    )
    where.add_argument(
        "--num-blocks", type=_positive_int, default=None, metavar="N",
        help="serve N blocks where the swarm needs them most",
    )  # fmt: skip
    net = p.add_argument_group("network")
    net.add_argument(
        "--initial-peers", nargs="+", default=list(_N.initial_peers), metavar="MADDR",
        help="multiaddrs of peers already in the swarm, as a running peer prints them (/ip4/.../tcp/.../p2p/...)",
    )  # fmt: skip
    net.add_argument(
        "--new-swarm",
        action="store_true",
        help="start a new swarm: this server is its first peer (no bootstrap)",
    )
    net.add_argument(
        "--host", default=_N.host, help="interface to listen on (127.0.0.1 keeps it on loopback)"
    )
    net.add_argument("--port", type=int, default=_N.port, help="libp2p TCP port (0: any free port)")
    net.add_argument(
        "--announce-maddrs", nargs="*", default=list(_N.announce_maddrs), metavar="MADDR",
        help="addresses others should dial, when they differ from the listened ones (NAT, port forwarding)",
    )  # fmt: skip
    net.add_argument(
        "--identity", default=_N.identity_path, metavar="FILE",
        help="private key file: keeps the same peer id across restarts (made if missing)",
    )  # fmt: skip
    net.add_argument(
        "--startup-timeout",
        type=float,
        default=_N.startup_timeout,
        help="seconds to start p2pd and join the DHT",
    )
    net.add_argument("--use-relay", action="store_true", help="use libp2p circuit relays (peers behind NAT)")
    net.add_argument(
        "--swarm-key", default=_N.swarm_key_path, metavar="FILE",
        help="private swarm: file with the secret all its peers share (default: an open swarm)",
    )  # fmt: skip
    net.add_argument(
        "--max-streams-per-peer", type=_positive_int, default=_N.max_streams_per_peer,
        help="incoming streams one peer may hold open at once",
    )  # fmt: skip
    net.add_argument(
        "--max-streams-total", type=_positive_int, default=_N.max_streams_total,
        help="incoming streams held open at once from all peers",
    )  # fmt: skip
    net.add_argument(
        "--link-delay-ms", type=float, default=None,
        help="emulated one-way delay of everything this server sends, ms (default: $POTLUCK_LINK_DELAY_MS or 0)",
    )  # fmt: skip
    net.add_argument(
        "--link-mbps", type=float, default=None,
        help="emulated uplink rate, Mbit/s (default: $POTLUCK_LINK_MBPS or 0, unlimited)",
    )  # fmt: skip
    net.add_argument(
        "--direct-port",
        type=int,
        default=_S.direct_port,
        help="port of the plain-TCP data path (0: any free port)",
    )
    net.add_argument(
        "--no-direct", action="store_true", help="serve over libp2p only (encrypted; slower on busy hosts)"
    )
    net.add_argument(
        "--no-push", action="store_true",
        help="never push step outputs to the next server nor accept pushes (clients then relay every hop)",
    )  # fmt: skip
    net.add_argument(
        "--metrics-port", type=int, default=_S.metrics_port,
        help="serve Prometheus /metrics on this port of --host (0: any free port; default: off)",
    )  # fmt: skip
    net.add_argument(
        "--bandwidth-mbps", type=float, default=_S.bandwidth_mbps,
        help="this server's network bandwidth, for the announced throughput",
    )  # fmt: skip
    model = p.add_argument_group("model")
    model.add_argument(
        "--model-prefix", default=_S.model_prefix, help="DHT name of the model (default: derived from MODEL)"
    )
    model.add_argument("--revision", default=_S.revision, help="hub revision (default: main)")
    model.add_argument("--token", default=_S.token, help="hub token for gated models (default: none)")
    model.add_argument(
        "--device", default=None, help="torch device, e.g. cuda:0 (default: cuda if available, else cpu)"
    )
    model.add_argument(
        "--dtype", default=_S.dtype, choices=DTYPE_CHOICES,
        help="weights and compute dtype; auto: bfloat16 on CUDA, float32 on CPU",
    )  # fmt: skip
    model.add_argument(
        "--quant", default=_S.quant, choices=("none", "int8", "nf4", "auto"),
        help="quantize the blocks' linear layers with bitsandbytes (auto: nf4 on CUDA where bf16 would not fit, "
        "none on CPU)",
    )  # fmt: skip
    model.add_argument(
        "--no-prepack", action="store_true",
        help="keep fp32 CPU weights in PyTorch's layout (default: reorder them for oneDNN's faster small-batch "
        "kernels while steps batch, and back after 16 one-row steps)",
    )  # fmt: skip
    model.add_argument(
        "--adapters", nargs="*", default=list(_S.adapters), metavar="DIR",
        help="PEFT LoRA adapters to preload; clients pick one by its directory name",
    )  # fmt: skip
    model.add_argument(
        "--public-name", default=_S.public_name, help="a name shown by `potluck status` (default: none)"
    )
    limits = p.add_argument_group("limits and timeouts")
    limits.add_argument(
        "--cache-tokens", type=_positive_int, default=_S.cache_tokens,
        help="KV-cache budget: sum over open sessions of batch * max_length",
    )  # fmt: skip
    limits.add_argument(
        "--max-inference-length", type=_positive_int, default=_S.max_inference_length,
        help="largest max_length one inference session may reserve",
    )  # fmt: skip
    limits.add_argument(
        "--max-batch-tokens", type=_positive_int, default=_S.max_batch_tokens,
        help="largest batch * tokens one step or forward may carry",
    )  # fmt: skip
    limits.add_argument(
        "--peer-cache-tokens", type=_positive_int, default=_S.peer_cache_tokens,
        help="KV cache one client peer may hold (default: half the budget, or one longest session if more)",
    )  # fmt: skip
    limits.add_argument(
        "--peer-sessions", type=_positive_int, default=_S.peer_sessions,
        help="inference sessions one client peer may hold open at once",
    )  # fmt: skip
    limits.add_argument(
        "--evict-idle-after", type=float, default=_S.evict_idle_after,
        help="when the cache is full, close sessions idle this long whose client holds more than its fair share (s)",
    )  # fmt: skip
    limits.add_argument(
        "--forward-chunk-tokens", type=_positive_int, default=_S.forward_chunk_tokens,
        help="rows*tokens of one piece of a forward/backward; larger ones are split so inference steps wait at most one",
    )  # fmt: skip
    limits.add_argument(
        "--step-token-budget", type=_positive_int, default=_S.step_token_budget,
        help="rows*tokens of one batched compute step; longer prefills are split into chunks of it",
    )  # fmt: skip
    limits.add_argument(
        "--batch-wait-ms", type=float, default=_S.batch_wait_ms,
        help="longest a decode batch waits for more decoding sessions (the first server of their chains for all "
        "of them, a later one for the rest of a burst; a lone session never waits); 0: never wait",
    )  # fmt: skip
    limits.add_argument(
        "--max-alloc-timeout", type=float, default=_S.max_alloc_timeout,
        help="longest a session may wait for cache room (s)",
    )  # fmt: skip
    limits.add_argument(
        "--step-timeout", type=float, default=_S.step_timeout,
        help="close inference sessions idle this long between steps (s)",
    )  # fmt: skip
    limits.add_argument(
        "--session-timeout",
        type=float,
        default=_S.session_timeout,
        help="hard cap on a session's lifetime (s)",
    )
    limits.add_argument(
        "--request-timeout", type=float, default=_S.request_timeout,
        help="cap on receiving one forward/backward request (s)",
    )  # fmt: skip
    limits.add_argument(
        "--drain-timeout", type=float, default=_S.drain_timeout,
        help="on SIGTERM/Ctrl-C, wait this long for in-flight steps (s)",
    )  # fmt: skip
    limits.add_argument(
        "--inflight-frame-bytes", type=_positive_int, default=_S.inflight_frame_bytes,
        help="bytes of incoming frames buffered at once, all clients together",
    )  # fmt: skip
    limits.add_argument(
        "--activation-bytes", type=_positive_int, default=_S.activation_bytes,
        help="bytes of training graphs kept for the backward that follows (oldest evicted first)",
    )  # fmt: skip
    limits.add_argument(
        "--compression", default=_S.compression, choices=COMPRESSIONS,
        help="compression of replies when the client does not ask for one",
    )  # fmt: skip
    swarm = p.add_argument_group("announcements and load balancing")
    swarm.add_argument(
        "--update-period", type=float, default=_S.update_period, help="re-announce DHT records this often (s)"
    )
    swarm.add_argument(
        "--expiration", type=float, default=None,
        help="records expire this long after each announcement (default: 2 x --update-period, at least 3 s); "
        "a killed server vanishes from the swarm after at most this long",
    )  # fmt: skip
    swarm.add_argument(
        "--throughput", type=float, default=_S.throughput,
        help="announced tokens/s per block (default: measured at start)",
    )  # fmt: skip
    swarm.add_argument(
        "--balance-quality", type=float, default=_S.balance_quality,
        help="with automatic placement, move when the swarm's throughput would grow past 1/this (0: never move)",
    )  # fmt: skip
    swarm.add_argument(
        "--balance-check-period", type=float, default=_S.balance_check_period,
        help="seconds between rebalancing checks (randomised +-50%%)",
    )  # fmt: skip
    swarm.add_argument(
        "--start-delay-max", type=float, default=_S.start_delay_max,
        help="with automatic placement, wait up to this long (random) before choosing blocks (s)",
    )  # fmt: skip


def check_serve_flags(args: argparse.Namespace) -> None:
    """Combinations of flags that cannot work; checked before anything slow."""
    if args.blocks is not None and args.num_blocks is not None:
        raise UsageError(
            "pass --blocks A:B (a fixed span) or --num-blocks N (placed automatically), not both"
        )
    if args.new_swarm and args.initial_peers:
        raise UsageError(
            "--new-swarm starts a new swarm: drop --initial-peers, or drop --new-swarm to join theirs"
        )
    if not args.new_swarm and not args.initial_peers:
        raise UsageError(
            "pass --initial-peers MADDR (as a running peer printed it) to join a swarm, or --new-swarm to start one"
        )


def server_config_from_args(args: argparse.Namespace, *, model: str, device: str) -> ServerConfig:
    """The parsed options as a ``ServerConfig`` (``model`` and ``device`` already checked / resolved)."""
    check_serve_flags(args)
    node = NodeOptions(
        initial_peers=tuple(args.initial_peers),
        host=args.host,
        port=args.port,
        announce_maddrs=tuple(args.announce_maddrs),
        identity_path=args.identity,
        startup_timeout=args.startup_timeout,
        use_relay=args.use_relay,
        swarm_key_path=args.swarm_key,
        max_streams_per_peer=args.max_streams_per_peer,
        max_streams_total=args.max_streams_total,
        link_delay_ms=args.link_delay_ms,
        link_mbps=args.link_mbps,
    )
    fields: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "blocks", "num_blocks", "model_prefix", "dtype", "quant", "revision", "token", "public_name", "cache_tokens",
            "max_inference_length", "max_batch_tokens", "max_alloc_timeout", "step_timeout", "session_timeout",
            "request_timeout", "update_period", "drain_timeout", "throughput", "compression", "bandwidth_mbps",
            "balance_quality", "balance_check_period", "start_delay_max", "inflight_frame_bytes",
            "activation_bytes", "metrics_port", "peer_cache_tokens", "peer_sessions",
            "step_token_budget", "batch_wait_ms", "evict_idle_after", "forward_chunk_tokens",
        )
    }  # fmt: skip
    expiration = args.expiration if args.expiration is not None else max(2 * args.update_period, 3.0)
    return ServerConfig(
        model=model,
        node=node,
        device=device,
        expiration=expiration,
        direct_port=None if args.no_direct else args.direct_port,
        push=not args.no_push,
        prepack=not args.no_prepack,
        adapters=tuple(args.adapters),
        **fields,
    )
