"""How a node joins the swarm; apart from ``transport.py`` so that configs and the command line can name it
without importing hivemind (which takes seconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeOptions:
    """How a node joins the swarm."""

    initial_peers: tuple[
        str, ...
    ] = ()  # multiaddrs of any peers already in the swarm; empty starts a new one
    host: str = "0.0.0.0"  # interface to listen on; 127.0.0.1 keeps a test swarm on loopback
    port: int = 0  # TCP port to listen on; 0 picks a free one
    announce_maddrs: tuple[
        str, ...
    ] = ()  # addresses others should dial, when they differ from the listened ones
    identity_path: str | None = None  # private key file: a fixed peer id across restarts
    client_mode: bool = False  # a client takes no incoming DHT requests and is not stored in routing tables
    startup_timeout: float = 30.0  # seconds to wait for p2pd to start and the DHT to bootstrap
    use_relay: bool = False  # libp2p circuit relays for peers behind NAT
    # emulated one-way delay (ms) on everything this process sends; None: $POTLUCK_LINK_DELAY_MS or 0
    link_delay_ms: float | None = None
    # emulated uplink rate (Mbit/s, 0: unlimited); None: $POTLUCK_LINK_MBPS or 0
    link_mbps: float | None = None
    swarm_key_path: str | None = (
        None  # private swarm: file with a shared secret; peers without it are refused
    )
    max_streams_per_peer: int = 64  # incoming streams one peer may hold open at once (more are refused)
    max_streams_total: int = 1024  # incoming streams held open at once from all peers together
