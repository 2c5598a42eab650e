"""Push messages are bounded like every message, and a push is accepted only from the named peer with its token."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from potluck.server.push import _accepts
from potluck.wire import ProtocolError, PushConfig, PushHello, PushTarget, parse_message

PEER = "12D3KooWQ5Zz5r1mQ1FhJzW3r9JvS9X3b8Y7Uu3k6Nq3T4ZGd9nE"
TOKEN = "ab" * 16


def test_push_messages_parse_and_refuse_out_of_bounds_fields() -> None:
    target = {"peer_id": PEER, "session_id": "0f" * 16, "token": TOKEN}
    msg = parse_message("push_config", {"next": target, "accept_from": PEER, "accept_token": TOKEN})
    assert isinstance(msg, PushConfig) and msg.next == PushTarget(**target)
    assert isinstance(parse_message("push_hello", {"session_id": "0f", "token": TOKEN}), PushHello)
    bad: list[tuple[str, dict[str, Any]]] = [
        ("push_hello", {"session_id": "0f", "token": "short"}),
        ("push_hello", {"session_id": "0f", "token": "g" * 32}),  # not hex
        ("push_hello", {"session_id": "x" * 65, "token": TOKEN}),
        ("push_config", {"accept_from": "P" * 129, "accept_token": TOKEN}),
        ("push_config", {"next": {**target, "peer_id": "../etc"}}),
        ("push_config", {"next": target, "extra": 1}),
    ]
    for kind, payload in bad:
        with pytest.raises(ProtocolError):
            parse_message(kind, payload)


def test_a_push_needs_the_named_peer_and_its_token() -> None:
    entry: Any = SimpleNamespace(accept_from=PEER, accept_token=TOKEN, changed=asyncio.Event())
    assert _accepts(entry, PEER, TOKEN)
    assert not _accepts(entry, PEER, "cd" * 16)  # wrong token
    assert not _accepts(entry, PEER[:-1] + "F", TOKEN)  # another peer holding the token
    entry.accept_token = None
    assert not _accepts(entry, PEER, TOKEN)  # nothing configured: nobody may push
