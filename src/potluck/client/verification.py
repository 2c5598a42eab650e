"""Catching servers that return wrong hidden states: re-run a random fraction of steps elsewhere and compare.

Signed records stop peers from speaking for others, but a server can still compute wrongly on purpose (or on
broken hardware). With ``verify_fraction`` f, each inference step of each hop is re-run with probability f on a
second server holding the same blocks, as a stateless forward over the hop's whole input history (so it needs no
KV cache there); the outputs of the new positions are compared within a tolerance for the dtypes involved.

On a mismatch a third server decides: whoever disagrees with it is the liar. The liar is banned and marked
suspect (never routed to again by this client). If the liar was the hop itself, the session rolls back to the
last position at which that hop was verified, replaces the hop (the replacement replays the verified history),
and raises ``VerificationRollback``: the generation loop drops the tokens chosen after that position and
generates them again through honest servers, so the final tokens are those of an honest swarm (a streamer has
already shown the tokens after that position; it then receives the regenerated ones). With f = 1.0
every step is checked (full redundancy, at least twice the compute); the default is a small spot check.

A liar that lies on every step is caught after about 1/f steps of its hop (f = 0.05: within 100 steps with
probability 1 - 0.95^100 = 99.4%); one that lies rarely is caught proportionally later. Verification needs a
second server covering the hop's whole span; hops without one are not checked (logged once).

Re-runs go through ``RemoteBlocks.forward_hop``, the path of every stateless forward, and a checker that fails
(connection lost, no reply in time, an ErrorReply) is classified by the client's one failure policy
(``failures.py``): banned or left out of the check, never taken for a liar, and the next holder is asked.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from potluck.client.failures import Failover, HopFailure
from potluck.client.remote_blocks import RemoteBlocks
from potluck.errors import RetriesExhaustedError
from potluck.swarm.routing import RouteHop, RouteRequirements, unsuitable_reason

if TYPE_CHECKING:
    from potluck.client.inference import HopSession, RemoteInferenceSession
    from potluck.client.swarm_view import SwarmView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Outputs match when ``|a - b| <= atol + rtol * |b|`` everywhere (like ``torch.allclose``)."""

    rtol: float
    atol: float


# Two honest servers differ by accumulation order (a full forward vs. incremental decode steps, other kernels and
# thread counts): ~1e-6 relative in float32, ~1e-3 in half precision. The bounds leave room for that and for lossy
# wire compression, and stay far below a tampering that changes what the model computes.
DTYPE_TOLERANCE = {
    "float32": Tolerance(rtol=1e-3, atol=1e-4),
    "float16": Tolerance(rtol=1e-2, atol=1e-2),
    "bfloat16": Tolerance(rtol=5e-2, atol=5e-2),
}
COMPRESSION_TOLERANCE = {
    "none": Tolerance(0.0, 0.0),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2),
    "bf16": Tolerance(rtol=5e-2, atol=5e-2),
    "int8": Tolerance(rtol=1e-1, atol=1e-1),
}


def tolerance_for(dtypes: list[str], compression: str) -> Tolerance:
    """The loosest tolerance among the servers' dtypes and the wire compression (unknown dtypes: bfloat16's)."""
    candidates = [DTYPE_TOLERANCE.get(d, DTYPE_TOLERANCE["bfloat16"]) for d in dtypes]
    candidates.append(COMPRESSION_TOLERANCE.get(compression, COMPRESSION_TOLERANCE["int8"]))
    return Tolerance(max(t.rtol for t in candidates), max(t.atol for t in candidates))


def outputs_match(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    """Whether two servers' outputs [B, T, H] agree within ``tol`` (both as float32)."""
    if a.shape != b.shape:
        return False
    a32, b32 = a.float(), b.float()
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        return bool(torch.equal(a32, b32))
    return bool(((a32 - b32).abs() <= tol.atol + tol.rtol * b32.abs()).all())


UNCONFIRMED = "<unconfirmed>"  # a check without verdict (never a peer id: those are base58)


class VerificationRollback(Exception):
    """A lying server was caught: tokens after ``position`` (server positions) must be generated again."""

    def __init__(self, position: int, liar: str):
        super().__init__(f"server {liar[-8:]} returned wrong outputs; rolling back to position {position}")
        self.position = position
        self.liar = liar


class Verifier:
    """Spot checks for one inference session (``RemoteInferenceSession.verifier``)."""

    def __init__(self, view: SwarmView, fraction: float, *, seed: int | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {fraction}")
        self.view = view
        self.blocks = RemoteBlocks(
            view
        )  # re-runs go the way of every stateless forward (and its failure policy)
        self.fraction = fraction
        self.rng = random.Random(seed)
        self.verified_until: dict[int, int] = {}  # id(HopSession) -> positions of that hop verified honest
        self.steps = 0  # hop-steps seen
        self.checks = 0  # hop-steps re-run on a second server
        self.caught: list[str] = []  # liars found, in order
        self.caught_at_step: int | None = None  # ``steps`` when the first liar was caught
        self._warned_unverifiable: set[tuple[int, int]] = set()

    async def after_step(
        self,
        session: RemoteInferenceSession,
        index: int,
        x_send: torch.Tensor,
        send_start: int,
        out: torch.Tensor,
    ) -> None:
        """Called by the session after hop ``index`` answered a step; may replace the hop and raise a rollback."""
        self.steps += 1
        if self.fraction <= 0 or self.rng.random() >= self.fraction:
            return
        hop = session.hops[index]
        end = send_start + x_send.shape[1]
        history = hop.history.get(0, send_start) if send_start > 0 else None
        full = x_send if history is None else torch.cat([history, x_send], dim=1)  # [B, end, H]
        liar = await self._check(session, hop, full, out)
        if liar is None:
            self.verified_until[id(hop)] = end
            return
        if liar == UNCONFIRMED:  # not checked after all: a later rollback goes back past these positions
            return
        self.caught.append(liar)
        if self.caught_at_step is None:
            self.caught_at_step = self.steps
        self.view.ban(liar, "returned wrong outputs (verification)")
        self.view.mark_suspect(
            liar, f"outputs of blocks {hop.hop.start}:{hop.hop.end} disagreed with two others"
        )
        if liar != hop.peer_id:
            self.verified_until[id(hop)] = end  # the verifier lied; the hop agreed with the third server
            return
        rollback_to = self.verified_until.pop(id(hop), 0)
        await session.replace_liar(index, liar, rollback_to)
        raise VerificationRollback(rollback_to, liar)

    async def _check(
        self, session: RemoteInferenceSession, hop: HopSession, full: torch.Tensor, out: torch.Tensor
    ) -> str | None:
        """None if ``out`` is confirmed, ``UNCONFIRMED`` if no verdict came (checkers failed, or two servers
        disagree with nobody to decide; the positions then do not count as verified), else the liar's peer id."""
        start, end = hop.hop.start, hop.hop.end
        exclude = {hop.peer_id}
        # a stateless forward of the whole history: the session's needs but no cache, and all its tokens at once
        needs = dataclasses.replace(
            session.needs, max_length=None, batch_tokens=full.shape[0] * full.shape[1]
        )
        if self._pick(start, end, exclude, needs) is None:
            if (start, end) not in self._warned_unverifiable:
                self._warned_unverifiable.add((start, end))
                logger.info("blocks %d:%d have no second server: their outputs are not verified", start, end)
            return UNCONFIRMED
        self.checks += 1
        # checkers that fail are handled by the client's one failure policy, like any other call
        failover = Failover(self.view, needs, f"verifying blocks {start}:{end}")
        tail = out.shape[1]
        checked = await self._rerun(session, failover, start, end, exclude, needs, full)
        if checked is None:
            return UNCONFIRMED  # no checker answered: no verdict on the checked server
        second, ref = checked
        if outputs_match(out, ref[:, -tail:], self._tolerance(hop.peer_id, second)):
            return None
        logger.warning(
            "servers %s and %s disagree on blocks %d:%d (max diff %.3g); asking a third",
            hop.peer_id[-8:], second[-8:], start, end, (out.float() - ref[:, -tail:].float()).abs().max(),
        )  # fmt: skip
        judged = await self._rerun(session, failover, start, end, exclude, needs, full)
        if judged is None:
            logger.warning("no third server answered for blocks %d:%d; no verdict", start, end)
            return UNCONFIRMED
        third, judge = judged
        if outputs_match(out, judge[:, -tail:], self._tolerance(hop.peer_id, third)):
            return second
        if outputs_match(ref, judge, self._tolerance(second, third)):
            return hop.peer_id
        logger.warning("three servers disagree on blocks %d:%d; no verdict", start, end)
        return UNCONFIRMED

    async def _rerun(
        self,
        session: RemoteInferenceSession,
        failover: Failover,
        start: int,
        end: int,
        exclude: set[str],
        needs: RouteRequirements,
        hidden: torch.Tensor,
    ) -> tuple[str, torch.Tensor] | None:
        """Blocks [start, end) over ``hidden`` [B, T, H] in one stateless forward on a random other holder, through
        the same path as ``model(...)`` calls (``RemoteBlocks.forward_hop``). A holder that fails is classified by
        the failure policy (banned, or left out of this check; a fatal answer is raised) and the next is asked;
        None when nobody is left or the policy gave up. Every holder asked is added to ``exclude``."""
        while (peer := self._pick(start, end, exclude, needs)) is not None:
            exclude.add(peer)
            hop = RouteHop(peer_id=peer, start=start, end=end)  # type: ignore[arg-type]
            try:
                out, _ = await self.blocks.forward_hop(hop, hidden, session.tuning)
                return peer, out
            except HopFailure as e:
                logger.info("verification forward on %s failed: %s", peer[-8:], e)
                try:
                    await failover.handle(e)
                except RetriesExhaustedError as gave_up:
                    logger.warning("verification of blocks %d:%d gave up: %s", start, end, gave_up)
                    return None
        return None

    def _pick(self, start: int, end: int, exclude: set[str], needs: RouteRequirements) -> str | None:
        """A random online server (not excluded, banned or suspect) covering [start, end) that can serve
        ``needs`` (the session's adapter and checkpoint: a checker without them would disagree honestly)."""
        banned = self.view.excluded() | exclude
        candidates = [
            s.peer_id
            for s in self.view.snapshot.servers_for_block(start)
            if s.end >= end and s.peer_id not in banned and unsuitable_reason(s, needs) is None
        ]
        return self.rng.choice(candidates) if candidates else None

    def _tolerance(self, *peers: str) -> Tolerance:
        dtypes = []
        for peer in peers:
            span = self.view.snapshot.servers.get(peer)  # type: ignore[call-overload]
            if span is not None:
                dtypes.append(span.record.dtype)
        return tolerance_for(dtypes, self.view.config.compression)
