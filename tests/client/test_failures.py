"""The client's failure policy (pure parts): every reply code classified once, what each verdict does."""

from __future__ import annotations

import asyncio
import typing
from dataclasses import dataclass, field
from typing import Any

import pytest

from potluck.client.config import ClientConfig
from potluck.client.failures import (
    REPLY_VERDICTS,
    Failover,
    Verdict,
    call_deadline,
    failure_from_exception,
    failure_from_reply,
)
from potluck.errors import (
    BadRequestError,
    DeadlineExceededError,
    LimitExceededError,
    ModelMismatchError,
    PotluckError,
    RetriesExhaustedError,
    TransportError,
    UnknownAdapterError,
)
from potluck.swarm.routing import RouteRequirements
from potluck.wire import ErrorCode, ErrorReply


@dataclass
class FakeView:
    """The parts of SwarmView the policy uses: config, bans and a refresh."""

    config: ClientConfig = field(default_factory=lambda: ClientConfig(max_retries=2))
    bans: list[str] = field(default_factory=list)
    refreshes: int = 0

    def ban(self, peer_id: str, reason: str) -> float:
        self.bans.append(peer_id)
        return 1.0

    async def refresh(self, *, min_age: float = 0.0) -> None:
        self.refreshes += 1


def _failover(view: FakeView) -> Failover:
    return Failover(view, RouteRequirements(), "test call")  # type: ignore[arg-type]


def test_every_reply_code_has_one_verdict() -> None:
    assert set(REPLY_VERDICTS) == set(typing.get_args(ErrorCode))
    fatal = {c for c, v in REPLY_VERDICTS.items() if v is Verdict.fatal}
    skip = {c for c, v in REPLY_VERDICTS.items() if v is Verdict.skip_server}
    assert fatal == {"bad_request", "unknown_model"}
    assert skip == {"limit_exceeded", "unknown_adapter"}


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("bad_request", BadRequestError),
        ("unknown_model", ModelMismatchError),
    ],
)
def test_fatal_replies_raise_at_once_with_the_servers_message_and_ban_nobody(
    code: str, error_type: type
) -> None:
    view = FakeView()
    failure = failure_from_reply(
        "peerA", ErrorReply(code=code, message="hidden size 65 != 64", retryable=False)
    )  # type: ignore[arg-type]
    with pytest.raises(error_type, match="hidden size 65 != 64") as exc:
        asyncio.run(_failover(view).handle(failure))
    assert isinstance(exc.value, PotluckError) and exc.value.code == code and exc.value.peer_id == "peerA"
    assert view.bans == [] and view.refreshes == 0


@pytest.mark.parametrize(
    ("code", "error_type"), [("limit_exceeded", LimitExceededError), ("unknown_adapter", UnknownAdapterError)]
)
def test_unsuitable_servers_are_skipped_for_the_call_not_banned(code: str, error_type: type) -> None:
    view = FakeView()
    failover = _failover(view)
    asyncio.run(
        failover.handle(failure_from_reply("peerA", ErrorReply(code=code, message="m", retryable=False)))
    )  # type: ignore[arg-type]
    assert view.bans == [] and failover.retries == 0
    assert isinstance(failover.skipped["peerA"], error_type)


def test_retryable_failures_ban_and_are_bounded_by_max_retries() -> None:
    view = FakeView()
    failover = _failover(view)

    async def run() -> None:
        await failover.handle(
            failure_from_reply("a", ErrorReply(code="draining", message="m", retryable=True))
        )
        await failover.handle(failure_from_exception("b", TransportError("reset"), "step"))
        await failover.handle(failure_from_exception("c", TimeoutError(), "step"))

    with pytest.raises(RetriesExhaustedError, match="gave up after 2 failovers"):
        asyncio.run(run())
    assert view.bans == ["a", "b", "c"] and view.refreshes == 2


def test_call_deadline_is_one_typed_error_and_inner_timeouts_pass_through() -> None:
    async def slow() -> None:
        async with call_deadline(0.05, "a step"):
            await asyncio.sleep(5)

    with pytest.raises(DeadlineExceededError, match="a step did not finish within request_timeout=0.05s"):
        asyncio.run(slow())

    async def inner_timeout() -> None:
        async with call_deadline(5, "a step"):
            async with asyncio.timeout(0.01):  # a per-attempt limit: the caller's business, not the deadline
                await asyncio.sleep(1)

    with pytest.raises(TimeoutError) as exc:
        asyncio.run(inner_timeout())
    assert not isinstance(exc.value, DeadlineExceededError)


def test_errors_are_exported_from_potluck() -> None:
    import potluck

    names: Any = potluck.__all__
    for name in (
        "PotluckError",
        "BadRequestError",
        "ModelMismatchError",
        "LimitExceededError",
        "UnknownAdapterError",
        "MissingBlocksError",
        "RetriesExhaustedError",
        "TransportError",
    ):
        assert name in names and issubclass(getattr(potluck, name), potluck.PotluckError)
