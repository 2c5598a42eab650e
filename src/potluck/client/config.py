"""The client's typed configuration; every field is also a keyword of ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of swarm peers to join through (a bootstrap's address)
    model_prefix: str | None = None  # DHT name of the model; default derived from the checkpoint name
    host: str = "127.0.0.1"  # interface for the client's own p2pd (clients take no incoming connections)
    startup_timeout: float = 30.0  # seconds to start p2pd and join the DHT
    update_period: float = 30.0  # refresh the swarm view from the DHT this often in the background
    connect_timeout: float = 10.0  # opening a stream to a server and its first reply
    # an inference step, or one server's part of a forward/backward, unanswered this long: that server failed
    step_timeout: float = 30.0
    # the one deadline of a call (a generation step, opening a session, a forward, a backward), every
    # failover and wait for servers included; past it the call raises DeadlineExceededError
    request_timeout: float = 300.0
    max_retries: int = 8  # failovers allowed within one step / call before giving up
    ban_base: float = 5.0  # a failed server is avoided this long, doubled on each repeat failure
    ban_max: float = 300.0  # cap on a ban's length
    wait_for_servers: float = 60.0  # with no route, wait this long for servers to appear, then raise
    alloc_timeout: float = 30.0  # how long a server may queue our session for KV-cache room
    compression: str = "none"  # compression of hidden states we send and receive: none | fp16 | bf16 | int8
    max_replay_tokens: int = 4096  # a replay to a replacement server goes in steps of at most this many
    allowed_servers: tuple[str, ...] = ()  # if set, route only through these peer ids
    blocked_servers: tuple[str, ...] = ()  # never route through these peer ids
    # route only through servers whose blocks use one of these quantizations (none | int8 | nf4); empty: any
    allowed_quant: tuple[str, ...] = ()
    show_route: bool = False  # log each route chosen
    use_direct: bool = True  # use a server's plain-TCP data path when it announces one (else libp2p only)
    # servers pass each step's output straight to the next server (k + 1 links per step instead of 2k, see
    # client/push.py); False: the client relays every hop's output itself
    push: bool = True
    # an fp32 LM head on CPU takes oneDNN's packed layout while calls batch rows (models/cpu_linear.py):
    # concurrent sessions' heads, which run as one matmul (models/row_batching.py), then cost ~2 rows' worth for
    # 8 rows instead of ~4x; after a run of one-row calls it goes back to the dense layout
    prepack_head: bool = True
    tuning_mode: str | None = None  # None | "ptune" (soft prompt) | "deep_ptune" (+ a prompt per block)
    pre_seq_len: int = 16  # soft-prompt length for ptune / deep_ptune
    lora_rank: int = 0  # > 0: client-owned LoRA adapters of this rank on the remote blocks
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = alpha / rank)
    lora_targets: tuple[str, ...] = ()  # projections to adapt; empty: the family default (q and v)
    active_adapter: str | None = None  # use a PEFT adapter preloaded by the servers (`serve --adapters`)
    check_fingerprint: bool = True  # refuse servers announcing another checkpoint (models/fingerprint.py)
    # re-run this fraction of inference steps on a second server and compare (catches lying servers; 1.0 checks
    # every step, 0 turns it off); needs two servers holding a hop's blocks, see client/verification.py
    verify_fraction: float = 0.05
    verify_seed: int | None = None  # seed of the spot-check draws (reproducible runs); None: random
    swarm_key_file: str | None = None  # private swarm: the secret file its servers use (--swarm-key)
    # emulated one-way link delay (ms) on everything this client sends; None: $POTLUCK_LINK_DELAY_MS or 0
    link_delay_ms: float | None = None
    # emulated uplink rate (Mbit/s, 0: unlimited); None: $POTLUCK_LINK_MBPS or 0
    link_mbps: float | None = None

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[ClientConfig, dict[str, Any]]:
        """Take this config's fields out of ``kwargs``; return (config, remaining kwargs)."""
        names = {f.name for f in fields(cls)}
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        for key in ("initial_peers", "allowed_servers", "blocked_servers", "lora_targets", "allowed_quant"):
            if key in mine and isinstance(mine[key], str):
                mine[key] = (mine[key],)
            if key in mine:
                mine[key] = tuple(str(x) for x in mine[key])
        return cls(**mine), kwargs
