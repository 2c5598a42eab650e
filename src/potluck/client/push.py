"""The client's side of server-to-server push (servers' side: ``server/push.py``; messages: ``wire/push.py``).

A pushed step is sent to the first server only; each server sends its output to the next one and a copy to us,
and we read every hop's copy in chain order: it is that hop's output and the next hop's input, which we keep in the
hop's history exactly as when relaying, so failover (``inference.py``) replays the same tensors. The step is done
when the last server's output arrives.

Failures keep the one policy of ``failures.py``: a hop whose reply fails (lost stream, error reply, timeout) is
returned to the caller, which replaces it like a relayed hop and relays the rest of the step. A server that could
not push (next server dead, unreachable, refusing, or push turned off there) says so in its reply; we then send
its output on ourselves, and that link relays for the rest of the session.

Push is used for a step only when it fits: ``ClientConfig.push`` is on, the chain has two or more servers, every
server's cache holds exactly the session's positions (after a failover, the step that replays history to a
replacement is relayed), no beam-search row reorder is pending (those steps are relayed, see ``push_fits``), and
the step is not split into pieces (long replays are relayed). Verification spot checks run
on the copies, as they do on relayed outputs; speculative decoding's multi-token steps and rollbacks need nothing
special.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

import torch

from potluck.client.failures import (
    CONNECTION_ERRORS,
    HopFailure,
    failure_from_exception,
    failure_from_reply,
    unexpected_reply,
)
from potluck.wire import (
    ErrorReply,
    InferenceStep,
    InferenceStepResult,
    Message,
    PushConfig,
    PushTarget,
    read_message,
    write_message,
)

if TYPE_CHECKING:
    from potluck.client.inference import HopSession, RemoteInferenceSession

logger = logging.getLogger(__name__)


async def read_step_reply(hop: HopSession) -> tuple[Message, list[torch.Tensor]]:
    """The reply to ``hop``'s latest step (``hop.step_id``), skipping answers to earlier pushed steps.

    A server can still answer a pushed step the client has given up on (e.g. its previous server was replaced
    after pushing to it); those answers carry older step ids and are dropped here.
    """
    while True:
        msg, tensors = await read_message(hop.reader)
        if isinstance(msg, InferenceStepResult) and msg.step_id < hop.step_id:
            continue
        return msg, tensors


def push_fits(session: RemoteInferenceSession, x: torch.Tensor, position: int) -> bool:
    """Whether this step can be pushed (see the module docstring); otherwise it is relayed."""
    hops = session.hops
    if not session.view.config.push or len(hops) < 2 or all(h.push_off for h in hops[:-1]):
        return False
    if any(h.server_length != position or h.history.length != position for h in hops):
        return False  # a replacement needs its history replayed first
    if any(h.pending_hypo is not None for h in hops):
        # beam search's row reorder is relayed: were a server to die after pushing, the next one would have
        # reordered its cache already, and the relayed retry would reorder it a second time
        return False
    return x.shape[0] * x.shape[1] <= session.view.config.max_replay_tokens


async def configure_push(session: RemoteInferenceSession) -> None:
    """Tell every server whose neighbours changed where to push and whom to accept pushes from.

    Receivers are configured before their senders (reverse order), and each link gets a fresh secret token, so a
    server that left the chain (or any other peer) cannot push into it. No reply is awaited: a config that did
    not arrive shows as a failed step of that server, handled by the failure policy.
    """
    hops = session.hops
    for j in reversed(range(len(hops))):
        hop = hops[j]
        prev = hops[j - 1] if j > 0 and not hops[j - 1].push_off else None
        nxt = hops[j + 1] if j + 1 < len(hops) and not hop.push_off else None
        accept_key, next_key = (prev.uid if prev else None), (nxt.uid if nxt else None)
        if (accept_key, next_key) == (hop.push_accept_key, hop.push_next_key) and (
            nxt is None or nxt.push_accept_key == hop.uid
        ):
            continue
        if accept_key != hop.push_accept_key:
            hop.push_token = secrets.token_hex(16) if prev is not None else None
        hop.push_accept_key, hop.push_next_key = accept_key, next_key
        target = None
        if nxt is not None and nxt.push_token is not None:
            target = PushTarget(peer_id=nxt.peer_id, session_id=nxt.session_id, token=nxt.push_token)
        config = PushConfig(
            next=target, accept_from=prev.peer_id if prev else None, accept_token=hop.push_token
        )
        with contextlib.suppress(*CONNECTION_ERRORS):  # a dead stream fails the next step instead
            async with asyncio.timeout(session.view.config.step_timeout):
                await write_message(hop.writer, config)


async def pushed_step(
    session: RemoteInferenceSession, inputs: torch.Tensor, position: int
) -> tuple[int, torch.Tensor, HopFailure | None]:
    """Push ``inputs`` [B, T, H] at ``position`` through the chain.

    Returns ``(index, x, failure)``: hops before ``index`` are done and ``x`` is hop ``index``'s input (the final
    output when ``index == len(hops)``); ``failure`` is hop ``index``'s, for the caller to fail over and relay on.
    """
    await configure_push(session)
    cfg = session.view.config
    hops = session.hops
    step_id = max(h.step_id for h in hops) + 1
    for (
        hop
    ) in hops:  # every hop, so a relayed retry of this step gets a higher id than any late pushed answer
        hop.step_id = step_id
    num_new = inputs.shape[1]
    x, pushed_in = inputs, False
    for j, hop in enumerate(hops):
        pushes = j + 1 < len(hops) and not hop.push_off
        sent_at = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.step_timeout):
                if not pushed_in:  # the first hop, or the previous one could not push: we send it
                    step = InferenceStep(
                        step_id=step_id, position=position, pads=session.pads, hypo_ids=hop.pending_hypo,
                        push=pushes, chain_start=j == 0,
                    )  # fmt: skip
                    await write_message(hop.writer, step, [x], cfg.compression)
                msg, tensors = await read_step_reply(hop)
        except CONNECTION_ERRORS as e:
            return (
                j,
                x,
                failure_from_exception(hop.peer_id, e, f"pushed step (step_timeout {cfg.step_timeout}s)"),
            )
        if isinstance(msg, ErrorReply):
            return j, x, failure_from_reply(hop.peer_id, msg)
        if (
            not isinstance(msg, InferenceStepResult)
            or msg.step_id != step_id
            or len(tensors) != 1
            or (tensors[0].shape != x.shape)
        ):
            return j, x, unexpected_reply(hop.peer_id, "pushed inference_step")
        out = tensors[0]
        session.hop_times.append((hop.peer_id, time.perf_counter() - sent_at, msg.server_ms / 1000))
        if session.verifier is not None:  # [trust] the same spot checks as relayed outputs
            await session.verifier.after_step(session, j, x, position, out)
        hop.history.put(x, position)
        hop.server_length = position + num_new
        hop.pending_hypo = None
        session.view.clear_ban(hop.peer_id)
        pushed_in = pushes and msg.push_error is None
        if pushes and msg.push_error is not None:
            logger.info("server %s could not push to %s (%s): relaying that link from now on",
                        hop.peer_id[-8:], hops[j + 1].peer_id[-8:], msg.push_error)  # fmt: skip
            hop.push_off = True
        x = out
    return len(hops), x, None
