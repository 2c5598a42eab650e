"""Multiaddr validation for the command line, in a tenth of a second.

hivemind ships a self-contained copy of py-multiaddr (``hivemind/utils/multiaddr``: relative imports plus
base58/varint/netaddr/idna/cid). Importing it the normal way runs ``hivemind/__init__``, which imports torch and
the whole library: seconds before `potluck` could say that an address is mistyped. So the copy is loaded here as a
package of its own, ``_potluck_multiaddr``, without importing hivemind. The parser is the same code p2pd's
addresses go through in ``transport.py``; only the import path differs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "_potluck_multiaddr"


def _multiaddr_module() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    hivemind = importlib.util.find_spec("hivemind")  # finds the package without importing it
    if hivemind is None or not hivemind.submodule_search_locations:
        raise ImportError("hivemind is not installed")
    package = Path(next(iter(hivemind.submodule_search_locations))) / "utils" / "multiaddr"
    spec = importlib.util.spec_from_file_location(
        _NAME, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no multiaddr package at {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_NAME, None)
        raise
    return module


def maddr_problem(text: str, *, need_peer_id: bool = True) -> str | None:
    """Why ``text`` is not a usable multiaddr (``None`` if it is); peers to join through need ``/p2p/<id>``."""
    try:
        protocols = [p.name for p in _multiaddr_module().Multiaddr(text).protocols()]
    except Exception as e:  # the parser raises several ValueError subclasses, and worse on odd input
        return str(e).replace(f"Invalid MultiAddr {text!r}", "").strip(" :") or type(e).__name__
    if not any(name in protocols for name in ("ip4", "ip6", "dns", "dns4", "dns6")):
        return "no /ip4, /ip6 or /dns part"
    if "tcp" not in protocols and "udp" not in protocols:
        return "no /tcp/PORT part"
    if need_peer_id and "p2p" not in protocols:
        return "no /p2p/PEER_ID part"
    return None


def tcp_endpoint(text: str) -> tuple[str, int] | None:
    """(ip, port) of an ``/ip4|ip6/.../tcp/...`` multiaddr; None for others (dns, udp, ...) or invalid ones."""
    try:
        addr = _multiaddr_module().Multiaddr(text)
        names = [p.name for p in addr.protocols()]
        if "tcp" not in names:
            return None
        for family in ("ip4", "ip6"):
            if family in names:
                return str(addr.value_for_protocol(family)), int(addr.value_for_protocol("tcp"))
    except Exception:
        return None
    return None
