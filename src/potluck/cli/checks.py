"""Checks of command-line values that run before anything slow starts (p2pd, model loading, hub downloads).

Each check raises ``UsageError`` (exit 2) or ``CommandError`` (exit 1) with a message that says what to do.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from potluck.cli.errors import CommandError, UsageError

HUB_PROBE_TIMEOUT = 5.0  # seconds to wait for the hub before saying it is unreachable


def looks_like_local_path(name: str) -> bool:
    """True for what can only be meant as a directory: ``/x``, ``./x``, ``~/x``, ``a/b/c``, or ``dir/x`` where
    ``dir`` exists here. Hub ids are ``name`` or ``org/name``."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(head)


def check_model(name: str, *, revision: str | None = None, token: str | None = None) -> str:
    """The checkpoint ``name`` as a usable string: an existing directory, or a hub id whose config is cached or
    reachable. Fails at once instead of letting the hub client retry for half a minute."""
    if not name.strip():
        raise UsageError("the model name is empty: pass a hub id (org/name) or a checkpoint directory")
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UsageError(
                f"{name} is a directory but has no config.json: pass the folder of a saved checkpoint"
            )
        return expanded
    if looks_like_local_path(name):
        what = "is a file, not a checkpoint directory" if os.path.exists(expanded) else "does not exist"
        raise UsageError(f"model path {name} {what}: pass an existing checkpoint directory or a hub id")
    _check_hub_model(name, revision=revision, token=token)
    return name


def _check_hub_model(name: str, *, revision: str | None, token: str | None) -> None:
    import huggingface_hub
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if constants.HF_HUB_OFFLINE:
        if not isinstance(cached, str):
            raise CommandError(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it first or pass a checkpoint directory"
            )
        return
    try:
        huggingface_hub.model_info(name, revision=revision, token=token, timeout=HUB_PROBE_TIMEOUT)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise CommandError(
            f"no model {name} on the Hugging Face hub (or it is private/gated: pass --token); "
            "a local checkpoint must be given as a path that exists"
        ) from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise CommandError(f"model {name} has no revision {revision!r} on the hub") from None
    except huggingface_hub.errors.HfHubHTTPError:
        pass  # the hub answered (e.g. gated without a token): let the real download report the details
    except Exception as e:  # no network, DNS, timeout: the hub client would retry for ~30 s
        if isinstance(cached, str):
            # Everything may be cached: run offline, so later downloads do not retry the unreachable hub.
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
            return
        raise CommandError(
            f"cannot reach the Hugging Face hub to fetch {name} ({type(e).__name__}: {e}) and it is not "
            "cached: check the network, or pass a local checkpoint directory"
        ) from None


def check_maddrs(option: str, values: Sequence[str], *, need_peer_id: bool) -> None:
    """Every value must be a multiaddr (``/ip4/HOST/tcp/PORT/p2p/PEER_ID`` for peers to join through)."""
    from potluck.swarm.multiaddrs import maddr_problem

    for value in values:
        problem = maddr_problem(value, need_peer_id=need_peer_id)
        if problem:
            raise UsageError(
                f"{option}: {value!r} is not a valid multiaddr ({problem}); expected "
                + ("/ip4/HOST/tcp/PORT/p2p/PEER_ID as printed by a running peer" if need_peer_id else "/ip4/HOST/tcp/PORT")
            )  # fmt: skip


def check_port_free(host: str, port: int, option: str) -> None:
    """A fixed port that another process holds fails now, with the port named (0 means any free port)."""
    if port == 0:
        return
    if not 0 < port < 65536:
        raise UsageError(f"{option} {port} is not a TCP port (1-65535, or 0 for any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is already in use (another potluck peer?): "
                    f"pass another {option}, or 0 for any free port"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host} is not an address of this machine") from None
            raise CommandError(
                f"cannot listen on {host}:{port} ({e.strerror}): pass another {option}"
            ) from None


def check_peers_reachable(peers: Sequence[str], timeout: float = 3.0) -> None:
    """Fail at once, naming the addresses, when no initial peer accepts a TCP connection; the real join (p2pd)
    would fail too, only after seconds of start-up. Peers that cannot be probed (dns, udp) count as reachable."""
    from potluck.swarm.multiaddrs import tcp_endpoint

    problems = []
    for peer in peers:
        endpoint = tcp_endpoint(peer)
        if endpoint is None:
            return
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
            return
        except OSError as e:
            problems.append(f"{peer} ({e.strerror or type(e).__name__})")
    if problems:
        raise CommandError(
            f"could not reach any initial peer ({'; '.join(problems)}): check that the bootstrap peer is running "
            "there and that the address is the one it printed"
        )
