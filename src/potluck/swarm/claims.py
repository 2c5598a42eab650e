"""Throughput claims are not proofs: cap what servers announce before routing and placement use it.

Records are signed, so nobody can speak for another peer, but a peer can still claim 1e12 tokens/s for itself
and attract every route or push honest servers off their blocks. Before a snapshot reaches routing or placement,
each rate a server announces is replaced by what this reader observed of it, when it has (``observed``: measured
decode steps/s per block), and otherwise capped at the swarm's median of that rate. An honest majority thus
bounds what a liar gains to "as good as a typical server" until it is measured; ``trusted`` peers (a server's
own record) keep their claims.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping

from potluck.swarm.records import PLACEMENT_STATES, PeerIdStr, ServerSpan, SwarmSnapshot

CAPPED_RATES = ("throughput", "inference_rps", "forward_rps", "network_rps")


def swarm_medians(snapshot: SwarmSnapshot) -> dict[str, float]:
    """Per rate field, the median of the positive values announced by online and joining servers (0: none)."""
    medians: dict[str, float] = {}
    for name in CAPPED_RATES:
        values = [
            getattr(s.record, name)
            for s in snapshot.servers.values()
            if s.state in PLACEMENT_STATES and getattr(s.record, name) > 0
        ]
        medians[name] = statistics.median(values) if values else 0.0
    return medians


def cap_unobserved_claims(
    snapshot: SwarmSnapshot,
    observed: Mapping[str, float] | None = None,
    *,
    trusted: Collection[str] = (),
) -> SwarmSnapshot:
    """The same snapshot with every announced rate capped at the swarm median, except for ``trusted`` peers;
    a peer in ``observed`` gets the measured value as its ``inference_rps`` instead (higher or lower)."""
    observed = observed or {}
    medians = swarm_medians(snapshot)
    servers: dict[PeerIdStr, ServerSpan] = {}
    for peer_id, span in snapshot.servers.items():
        if peer_id in trusted:
            servers[peer_id] = span
            continue
        update = {
            name: min(getattr(span.record, name), medians[name])
            for name in CAPPED_RATES
            if getattr(span.record, name) > medians[name]
        }
        measured = observed.get(peer_id)
        if measured is not None and measured > 0:
            update["inference_rps"] = measured
        servers[peer_id] = ServerSpan(span.peer_id, span.record.model_copy(update=update)) if update else span
    return SwarmSnapshot(snapshot.model_prefix, snapshot.num_blocks, servers, snapshot.taken_at)
