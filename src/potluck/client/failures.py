"""The client's one failure policy, used by inference sessions and by forward/backward alike.

Every failure of a remote call is classified once, here, into one of three verdicts:

* ``retry_elsewhere``: this server failed in a way another may not (connection lost, no reply in time, a
  malformed reply, or an ErrorReply ``overloaded``, ``draining``, ``wrong_span``, ``cache_full``, ``evicted``,
  ``timeout``, ``internal``). The server is banned (exponential backoff), the call re-routes and goes on, at most
  ``max_retries`` times per call, then ``RetriesExhaustedError``.
* ``skip_server``: the request is valid but this server cannot serve it (``limit_exceeded``,
  ``unknown_adapter``): it is left out for the rest of this call, not banned (it is healthy). When every holder
  of some blocks is left out or unsuitable, the user gets the server's answer as a ``RequestError`` at once.
* ``fatal``: the request can never succeed (``bad_request``, ``unknown_model``): raised to the user at once as
  ``BadRequestError`` / ``ModelMismatchError`` with the server's message; nobody is banned, nothing retried.

Each call also has one deadline (``request_timeout``) covering every attempt, failover and wait for servers;
single attempts have their own shorter limits (``step_timeout``, ``connect_timeout``) that detect a frozen
server and count as ``retry_elsewhere``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from enum import StrEnum

from potluck.client.swarm_view import SwarmView
from potluck.errors import (
    BadRequestError,
    DeadlineExceededError,
    LimitExceededError,
    ModelMismatchError,
    RequestError,
    RetriesExhaustedError,
    TransportError,
    UnknownAdapterError,
)
from potluck.swarm.routing import RouteHop, RouteRequirements
from potluck.wire import ErrorReply, ProtocolError, StreamClosed

logger = logging.getLogger(__name__)


class Verdict(StrEnum):
    """What to do about one failed attempt."""

    retry_elsewhere = "retry_elsewhere"  # ban the server, re-route, go on (bounded by max_retries)
    skip_server = "skip_server"  # leave the server out of this call without banning it
    fatal = "fatal"  # raise to the user at once


# Every ErrorReply code, classified (wire/messages.py ErrorCode). A code missing here is a test failure.
REPLY_VERDICTS: dict[str, Verdict] = {
    "bad_request": Verdict.fatal,
    "unknown_model": Verdict.fatal,
    "limit_exceeded": Verdict.skip_server,
    "unknown_adapter": Verdict.skip_server,
    "wrong_span": Verdict.retry_elsewhere,
    "cache_full": Verdict.retry_elsewhere,
    # our idle session was closed for another client: re-open elsewhere; the ban (ban_base) keeps us off this full
    # server for a while, after which it may be chosen again if it is the only holder of those blocks
    "evicted": Verdict.retry_elsewhere,
    "overloaded": Verdict.retry_elsewhere,
    "draining": Verdict.retry_elsewhere,
    "timeout": Verdict.retry_elsewhere,
    "internal": Verdict.retry_elsewhere,
}

# The user-facing error type for each code whose verdict is not retry_elsewhere.
REPLY_ERRORS: dict[str, type[RequestError]] = {
    "bad_request": BadRequestError,
    "unknown_model": ModelMismatchError,
    "limit_exceeded": LimitExceededError,
    "unknown_adapter": UnknownAdapterError,
}

# Exceptions of one attempt that mean "this server (or the path to it) failed": the transport's own type,
# timeouts, resets, a stream closed early, and garbage where a message was expected.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    TransportError,
    TimeoutError,
    OSError,
    StreamClosed,
    ProtocolError,
    asyncio.IncompleteReadError,
)


class HopFailure(Exception):
    """One attempt at one server failed; ``verdict`` says what the caller does about it."""

    def __init__(self, peer_id: str, verdict: Verdict, message: str, error: RequestError | None = None):
        super().__init__(message)
        self.peer_id = peer_id
        self.verdict = verdict
        self.error = error  # the user-facing error, for skip_server and fatal


def failure_from_reply(peer_id: str, reply: ErrorReply) -> HopFailure:
    """Classify a server's ErrorReply (the one place reply codes are interpreted)."""
    verdict = REPLY_VERDICTS.get(reply.code, Verdict.retry_elsewhere)
    message = f"{reply.code}: {reply.message}"
    error = None
    if verdict is not Verdict.retry_elsewhere:
        error = REPLY_ERRORS[reply.code](
            f"server {peer_id} refused the request: {reply.message}", code=reply.code, peer_id=peer_id
        )
    return HopFailure(peer_id, verdict, message, error)


def failure_from_exception(peer_id: str, exc: BaseException, what: str) -> HopFailure:
    """Classify an exception of one attempt (one of ``CONNECTION_ERRORS``): always retry elsewhere."""
    if isinstance(exc, TimeoutError):
        return HopFailure(peer_id, Verdict.retry_elsewhere, f"{what}: no reply in time")
    return HopFailure(peer_id, Verdict.retry_elsewhere, f"{what}: {type(exc).__name__}: {exc}")


def unexpected_reply(peer_id: str, what: str) -> HopFailure:
    """A reply of the wrong kind or shape: a broken or hostile server, so go elsewhere."""
    return HopFailure(peer_id, Verdict.retry_elsewhere, f"malformed reply to {what}")


class Failover:
    """The failure policy of one call (one step, one session opening, one forward or backward).

    Usage, for both inference and training::

        failover = Failover(view, needs, "forward of blocks 0:8")
        while True:
            hops = await failover.route(start, end, inference=False)
            try:
                ... attempts that raise HopFailure ...
                break
            except HopFailure as e:
                await failover.handle(e)  # raises fatal errors; bans and counts retryable ones
    """

    def __init__(self, view: SwarmView, needs: RouteRequirements, what: str):
        self.view = view
        self.needs = needs
        self.what = what
        self.retries = 0  # retry_elsewhere failures so far in this call
        self.skipped: dict[str, RequestError] = {}  # servers left out of this call (not banned), and why

    async def route(self, start: int, end: int, *, inference: bool, batch_tokens: int = 0) -> list[RouteHop]:
        """The best chain over [start, end) for this call's needs, without banned or skipped servers."""
        return await self.view.route(
            start, end, batch_tokens=batch_tokens, inference=inference, needs=self.needs, skip=self.skipped
        )

    async def handle(self, failure: HopFailure) -> None:
        """Apply the policy to one failed attempt; returns when the caller should re-route and try again."""
        if failure.verdict is Verdict.fatal:
            assert failure.error is not None
            raise failure.error from None
        if failure.verdict is Verdict.skip_server:
            assert failure.error is not None
            logger.info("server %s cannot serve this request: %s", failure.peer_id[-8:], failure)
            self.skipped[failure.peer_id] = failure.error
            return
        self.retries += 1
        self.view.ban(failure.peer_id, str(failure))
        if self.retries > self.view.config.max_retries:
            raise RetriesExhaustedError(
                f"{self.what}: gave up after {self.view.config.max_retries} failovers "
                f"(last: server {failure.peer_id[-8:]}: {failure})"
            )
        with contextlib.suppress(TransportError, TimeoutError):
            await self.view.refresh(min_age=1.0)


@contextlib.asynccontextmanager
async def call_deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """The one deadline of a call: attempts, failovers and waits for servers all fit inside it."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except TimeoutError:
        if timeout.expired():
            raise DeadlineExceededError(
                f"{what} did not finish within request_timeout={seconds:g}s (failovers included)"
            ) from None
        raise
