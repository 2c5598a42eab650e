"""Routing for pushed inference (server-to-server push, ``server/push.py``): pure, deterministic, over a snapshot.

With push, a step crosses client -> s1 -> s2 -> ... -> sk -> client, so a chain's cost is

    rtt(client, s1)/2 + sum_i [ link(s_i, s_i+1) ] + rtt(sk, client)/2 + sum_i [ per_hop_overhead + L_i * per_block(s_i) ]

where ``link(a, b)`` is half the RTT between the two servers as announced in their records (``next_pings``, measured
by the servers themselves; the lower of the two when both announce one). For a pair nobody measured, the estimate is
what the detour through the client would cost, ``(rtt(client, a) + rtt(client, b)) / 4`` one way, so unmeasured
pairs are neither favoured nor shunned. The per-block and cache terms are those of relay routing (``routing.py``).

Search: dynamic programming over blocks (they only increase): state ``(b, i)`` = "blocks before b are done and the
last hop ran on candidate i, ending at b". Entering candidate j at b from i costs ``link(i, j)`` plus j's fixed cost,
and j may run any number of its blocks from b. Ties go to fewer hops, then to smaller peer ids, as in relay routing.
O(blocks * candidates^2 * span length), fine for the swarms one model has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from potluck.swarm.records import PeerIdStr, SwarmSnapshot
from potluck.swarm.routing import (
    RouteHop,
    RouteRequirements,
    RoutingCosts,
    _check_range,
    _inference_terms,
    _ns,
    _rtt,
    _usable_spans,
)

# (cost ns, hops, peer ids along the route): compared as a tuple, so ties break deterministically
_Score = tuple[int, int, tuple[str, ...]]


def server_link_seconds(
    snapshot: SwarmSnapshot, a: str, b: str, rtts: Mapping[str, float], costs: RoutingCosts
) -> float:
    """One-way time from server ``a`` to server ``b``: announced RTTs, else the estimate via the client."""
    measured = []
    for src, dst in ((a, b), (b, a)):
        span = snapshot.servers.get(PeerIdStr(src))
        rtt = span.record.next_pings.get(dst) if span is not None else None
        if rtt is not None:
            measured.append(min(rtt, costs.max_rtt))
    if measured:
        return min(measured) / 2
    return (_rtt(a, rtts, costs) + _rtt(b, rtts, costs)) / 4


def find_push_route(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    rtts: Mapping[str, float],
    batch_tokens: int,
    banned: Collection[str] = (),
    costs: RoutingCosts = RoutingCosts(),
    needs: RouteRequirements = RouteRequirements(),
) -> list[RouteHop]:
    """Route minimizing one pushed decode step over [start, end); arguments as ``find_inference_route``."""
    _check_range(snapshot, start, end)
    if start == end:
        return []
    usable = _usable_spans(snapshot, start, end, banned, needs)
    cands = []  # (peer, start, end, fixed ns without the rtt, per block ns)
    for span in usable:
        fixed, per_block = _inference_terms(span, 0.0, batch_tokens, costs)
        cands.append((span.peer_id, max(span.start, start), min(span.end, end), fixed, per_block))
    links: dict[tuple[int, int], int] = {}

    def link(i: int, j: int) -> int:
        if (i, j) not in links:
            links[i, j] = _ns(server_link_seconds(snapshot, cands[i][0], cands[j][0], rtts, costs))
        return links[i, j]

    # best[b][i]: best score of a partial route whose last hop is candidate i, ending at block b
    best: dict[int, dict[int, tuple[_Score, tuple[RouteHop, ...]]]] = {b: {} for b in range(start, end + 1)}

    def offer(b: int, i: int, score: _Score, route: tuple[RouteHop, ...]) -> None:
        current = best[b].get(i)
        if current is None or score < current[0]:
            best[b][i] = (score, route)

    def enter(
        j: int, b: int, entry_cost: int, hops: int, peers: tuple[str, ...], route: tuple[RouteHop, ...]
    ) -> None:
        peer, _, c_end, fixed, per_block = cands[j]
        cost = entry_cost + fixed
        for e in range(b + 1, c_end + 1):
            cost += per_block
            offer(e, j, (cost, hops + 1, (*peers, peer)), (*route, RouteHop(PeerIdStr(peer), b, e)))

    for j, (peer, c_start, _, _, _) in enumerate(cands):
        if c_start <= start:
            enter(j, start, _ns(_rtt(peer, rtts, costs) / 2), 0, (), ())
    for b in range(start + 1, end):
        for i, ((cost, hops, peers), route) in sorted(best[b].items()):
            for j, (_, c_start, c_end, _, _) in enumerate(cands):
                if j != i and c_start <= b < c_end:
                    enter(j, b, cost + link(i, j), hops, peers, route)
    finals = [
        ((cost + _ns(_rtt(cands[i][0], rtts, costs) / 2), hops, peers), route)
        for i, ((cost, hops, peers), route) in best[end].items()
    ]
    return list(min(finals)[1])
