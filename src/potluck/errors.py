"""Every error potluck raises to its user, in one hierarchy (re-exported from ``potluck``).

``except potluck.PotluckError`` catches everything the library raises on purpose. Below it, one type per
kind of failure, so callers can tell "fix your request" from "the swarm cannot serve you now":

    PotluckError
    ├── RequestError              the request can never succeed as sent; nobody was banned, nothing retried
    │   ├── BadRequestError       a server refused it as malformed (shape, dtype, size) — ``bad_request``
    │   ├── LimitExceededError    it exceeds a server limit (max_length, batch*tokens) on every server
    │   ├── UnknownAdapterError   no server holds the named ``active_adapter``
    │   └── ModelMismatchError    the servers run another model (config or weights) under the same name
    ├── MissingBlocksError        no usable server holds some blocks, even after waiting (swarm/routing.py)
    ├── RetriesExhaustedError     servers kept failing (lost, frozen, overloaded) beyond ``max_retries``
    ├── DeadlineExceededError     the call's deadline (``request_timeout``) passed
    └── TransportError            the network layer failed (p2pd, a stream, a direct connection)
        └── SwarmError            the swarm could not be joined (bootstrap down, bad address)

This module imports nothing from potluck, so every layer (wire, swarm, server, client) can use it.
"""

from __future__ import annotations

from typing import Any


class PotluckError(Exception):
    """Base of every error potluck raises on purpose."""


class RequestError(PotluckError, ValueError):
    """The request cannot succeed as sent (deterministic): fix it rather than retry.

    ``code`` is the server's ``ErrorReply`` code when a server said so, ``peer_id`` the server that did
    (None when the client found out from the servers' announcements without asking any).
    """

    def __init__(self, message: str, *, code: str | None = None, peer_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.peer_id = peer_id


class BadRequestError(RequestError):
    """A server refused the request as malformed (wrong shape, dtype, size, tuning tensors)."""


class LimitExceededError(RequestError):
    """The request exceeds a limit (``max_length``, batch*tokens) of every server that could serve it."""


class UnknownAdapterError(RequestError):
    """No server that holds the blocks offers the requested ``active_adapter``."""


class ModelMismatchError(RequestError):
    """The servers serve a different model (config or weights) than the client's under the same DHT name."""


class MissingBlocksError(PotluckError, RuntimeError):
    """No usable server holds some of the requested blocks (``missing``, ascending)."""

    def __init__(self, missing: list[int] | tuple[int, ...], detail: str = "") -> None:
        self.missing: list[int] = sorted(set(missing))
        self.detail = detail
        # servers that hold some of the blocks but cannot serve this request (routing.Unsuitable), if any
        self.unsuitable: list[Any] = []
        msg = f"no online server holds blocks {format_block_ranges(self.missing)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)

    def __reduce__(self) -> tuple[type[MissingBlocksError], tuple[list[int], str]]:
        # Custom __init__ args: make it survive pickling (multiprocessing, asyncio executors).
        return (type(self), (self.missing, self.detail))


class RetriesExhaustedError(PotluckError, RuntimeError):
    """Servers kept failing in ways another server might not (lost, frozen, overloaded) past ``max_retries``."""


class DeadlineExceededError(PotluckError, TimeoutError):
    """A call did not finish within its deadline (``request_timeout``), failovers included."""


class TransportError(PotluckError, ConnectionError):
    """The network layer failed: a peer unreachable, a stream refused or reset, the daemon gone."""


class SwarmError(TransportError):
    """The swarm could not be joined or reached (p2pd did not start, no initial peer answered)."""


def format_block_ranges(blocks: list[int] | tuple[int, ...]) -> str:
    """[3, 4, 5, 7] -> "3-5, 7" (inclusive ranges, for humans)."""
    parts: list[str] = []
    ordered = sorted(set(blocks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)
