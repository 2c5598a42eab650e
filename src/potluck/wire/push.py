"""Messages of server-to-server push (see ``server/push.py`` and ``client/push.py``).

With push, a step's output goes from each server straight to the next one instead of back through the client.
The client tells each server, on its own inference stream, where to push (``PushConfig.next``) and whom to
accept pushes from (``PushConfig.accept_from`` + ``accept_token``). A server opens one push stream per session
to the next server (protocol ``PROTOCOL_PUSH``), proves with ``PushHello`` that the client named it for that
session, and then writes ``InferenceStep(push=True)`` frames on it; the receiver answers each step's output to the
client on the client's own stream, exactly like a relayed step.

Tokens are per (session, link) secrets chosen by the client (``secrets.token_hex``): a peer that does not know
the token cannot inject hidden states into someone else's session, even knowing its session id. Receivers compare
them in constant time and also check the pushing peer's (libp2p- or handshake-authenticated) id.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from potluck.wire.messages import MESSAGE_TYPES, Message

MAX_PEER_ID_CHARS = 128  # base58 peer ids are ~46-52 chars
PushToken = Annotated[str, Field(pattern=r"^[0-9a-f]{32,64}$")]  # 16-32 random bytes, hex
SessionIdStr = Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]
PeerIdText = Annotated[
    str, Field(min_length=1, max_length=MAX_PEER_ID_CHARS, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")
]


class PushTarget(Message):
    """Where a server pushes its step outputs: the next server's peer and session, and the link's token."""

    peer_id: PeerIdText
    session_id: SessionIdStr
    token: PushToken


class PushConfig(Message):
    """Client -> server, on the inference stream, between steps; no reply. Replaces the previous config.

    ``next``: push outputs of steps sent with ``push=True`` there (None: answer them to the client only).
    ``accept_from`` / ``accept_token``: the previous server of the chain, allowed to push steps into this session
    (None: accept no pushes).
    """

    kind: Literal["push_config"] = "push_config"
    next: PushTarget | None = None
    accept_from: PeerIdText | None = None
    accept_token: PushToken | None = None


class PushHello(Message):
    """First message of a push stream (server -> next server): which session, and the client's token for it."""

    kind: Literal["push_hello"] = "push_hello"
    session_id: SessionIdStr
    token: PushToken


class PushAccepted(Message):
    """The reply to a valid ``PushHello``; the stream then carries ``InferenceStep(push=True)`` frames only."""

    kind: Literal["push_accepted"] = "push_accepted"


# Registered with the other kinds, so ``parse_message`` validates them like any message.
for _cls in (PushConfig, PushHello, PushAccepted):
    MESSAGE_TYPES[_cls.model_fields["kind"].default] = _cls
