"""Choosing which servers run which blocks for a request: pure, deterministic functions over a ``SwarmSnapshot``.

Cost model. The client relays between hops (no server-to-server push yet), so one step is
client -> s1 -> client -> s2 -> ... -> client, and a hop on server ``s`` running ``L`` blocks costs

    rtt(s) + per_hop_overhead + L * per_block(s) [+ cache_penalty]

where ``per_block`` is ``1 / inference_rps`` for inference (one decode step) and ``num_tokens / forward_rps`` for
forward passes. A full RTT per hop (not Petals' rtt/2 in + next_ping/2 between) is what relaying really costs.
Costs are summed as integer nanoseconds: exact, so equal-cost routes really tie (float sums of the same terms in
a different order differ in the last bit, which would make the fewer-hops tie-break flaky).

Search. Dijkstra over nodes ``("client", b)`` = "the client holds the hidden states after block b-1" and
``(s, b)`` = "inside server s, blocks up to b-1 done". Entering ``s`` at block ``b`` pays the hop's fixed cost,
each block inside ``s`` pays ``per_block(s)``, leaving to the client is free. Because a server may run any
sub-range of its span, this covers partial hops (route 2:4 over 1:3 and 3:4 = [1:3 -> 2:3, 3:4]) with a graph of
size O(sum of span lengths + servers per block) instead of O(span^2) explicit sub-range edges. Blocks only
increase, so the graph is a DAG; Dijkstra is used anyway because it stops as soon as ``end`` is settled. Heap
entries are ordered by (cost, hops, peer_id, block, ...), so equal-cost routes prefer fewer hops, then smaller
peer ids: the same snapshot always yields the same route, regardless of dict order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from potluck.errors import (
    LimitExceededError,
    MissingBlocksError,
    ModelMismatchError,
    RequestError,
    UnknownAdapterError,
    format_block_ranges,
)
from potluck.swarm.records import PeerIdStr, ServerSpan, ServerState, SwarmSnapshot

__all__ = [
    "MissingBlocksError",
    "RouteHop",
    "RouteRequirements",
    "RoutingCosts",
    "Unsuitable",
    "find_forward_route",
    "find_inference_route",
    "format_block_ranges",
    "format_route",
    "route_cost",
    "unservable_blocks_error",
    "unsuitable_reason",
]


@dataclass(frozen=True)
class RouteRequirements:
    """What a request needs from every server on its route. Servers that cannot serve it are left out of the
    route (they are not banned: they are healthy, just not for this request)."""

    adapter: str | None = None  # the server must announce this preloaded adapter (``active_adapter``)
    max_length: int | None = None  # inference: the server's ``max_inference_length`` must be at least this
    batch_tokens: int | None = None  # batch*tokens of the largest message; above ``max_batch_tokens`` is out
    fingerprint: str | None = None  # the client's checkpoint fingerprint; servers announcing another are out


# Why a server cannot serve a request, most fundamental first (the first that applies is reported).
UnsuitableKind = Literal["model_mismatch", "unknown_adapter", "limit_exceeded"]


@dataclass(frozen=True)
class Unsuitable:
    """An online, non-banned server left out of a route because it cannot serve the request."""

    peer_id: str
    start: int
    end: int
    kind: UnsuitableKind
    reason: str  # for humans: what the server announces versus what the request needs


def unsuitable_reason(span: ServerSpan, needs: RouteRequirements) -> Unsuitable | None:
    """Why ``span``'s server cannot serve a request with ``needs`` (None: it can). Pure, from its record."""
    rec = span.record

    def out(kind: UnsuitableKind, reason: str) -> Unsuitable:
        return Unsuitable(span.peer_id, span.start, span.end, kind, reason)

    if needs.fingerprint is not None and rec.fingerprint is not None and rec.fingerprint != needs.fingerprint:
        return out(
            "model_mismatch", f"server fingerprint {rec.fingerprint}, client fingerprint {needs.fingerprint}"
        )
    if needs.adapter is not None and needs.adapter not in rec.adapters:
        offered = ", ".join(rec.adapters) or "none"
        return out("unknown_adapter", f"adapter {needs.adapter!r} not loaded (offers: {offered})")
    if needs.max_length is not None and rec.max_inference_length < needs.max_length:
        return out(
            "limit_exceeded",
            f"max_length {needs.max_length} is above its max_inference_length {rec.max_inference_length}",
        )
    if needs.batch_tokens is not None and 0 < rec.max_batch_tokens < needs.batch_tokens:
        return out(
            "limit_exceeded",
            f"{needs.batch_tokens} batch*tokens are above its max_batch_tokens {rec.max_batch_tokens}",
        )
    return None


def unservable_blocks_error(error: MissingBlocksError) -> RequestError | None:
    """The deterministic error behind ``error``, if every missing block is held by servers that are online and
    not banned but cannot serve the request (waiting would not help); None if some block has no holder at all.

    The kind reported is that of the lowest missing block's holders (most fundamental kind first).
    """
    if not error.missing or not error.unsuitable:
        return None
    for block in error.missing:
        if not any(u.start <= block < u.end for u in error.unsuitable):
            return None
    first = error.missing[0]
    holders = [u for u in error.unsuitable if u.start <= first < u.end]
    order: list[UnsuitableKind] = ["model_mismatch", "unknown_adapter", "limit_exceeded"]
    kind = min((u.kind for u in holders), key=order.index)
    chosen = [u for u in holders if u.kind == kind]
    detail = "; ".join(f"server {u.peer_id} (blocks {u.start}:{u.end}): {u.reason}" for u in chosen[:4])
    blocks = format_block_ranges(error.missing)
    if kind == "model_mismatch":
        return ModelMismatchError(
            f"the servers of blocks {blocks} run a different checkpoint than this client under the same name "
            f"({detail}); load the same checkpoint (config and weights) as the servers or use another "
            "model_prefix",
            code="model_mismatch",
            peer_id=chosen[0].peer_id,
        )
    if kind == "unknown_adapter":
        return UnknownAdapterError(
            f"no server holding blocks {blocks} offers the requested adapter ({detail})",
            code="unknown_adapter",
            peer_id=chosen[0].peer_id,
        )
    return LimitExceededError(
        f"the request exceeds the limits of every server holding blocks {blocks} ({detail})",
        code="limit_exceeded",
        peer_id=chosen[0].peer_id,
    )


@dataclass(frozen=True)
class RouteHop:
    """One hop: ``peer_id`` runs blocks [start, end), a sub-range of its announced span."""

    peer_id: PeerIdStr
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RoutingCosts:
    """Constants of the cost model, in seconds unless noted. Tune per deployment; tests pin their own."""

    # RTT assumed for peers the client has not measured yet (pessimistic-ish WAN value)
    default_rtt: float = 0.1
    # measured RTTs are capped here, so an unreachable (inf) peer is avoided but still routable
    max_rtt: float = 5.0
    # serialization + daemon cost per hop, measured on our stack (Petals: 18 ms)
    per_hop_overhead: float = 0.002
    default_inference_rps: float = 300.0  # decode steps/s per block for servers announcing 0 (unmeasured)
    default_forward_rps: float = 2000.0  # forward tokens/s per block for servers announcing 0 (unmeasured)
    # added when a server lacks KV-cache room: large, so used only if nothing else fits
    cache_penalty: float = 10.0


# --- per-hop cost terms -----------------------------------------------------------------------------------------


def _rtt(peer_id: str, rtts: Mapping[str, float], costs: RoutingCosts) -> float:
    rtt = rtts.get(peer_id)
    if rtt is None or math.isnan(rtt) or rtt < 0:
        return costs.default_rtt
    return min(rtt, costs.max_rtt)


# caps any single term (e.g. a near-zero network_rps) so the nanosecond conversion stays finite
_MAX_TERM_S = 1e9


def _ns(seconds: float) -> int:
    return round(min(seconds, _MAX_TERM_S) * 1e9)


def _inference_terms(span: ServerSpan, rtt: float, batch_tokens: int, costs: RoutingCosts) -> tuple[int, int]:
    """(fixed cost per hop, cost per block) of one decode step on ``span``, in nanoseconds."""
    rec = span.record
    rps = rec.inference_rps if rec.inference_rps > 0 else costs.default_inference_rps
    # cache_tokens_left is announced as batch*tokens a new session over the server's *whole* span may still take,
    # so comparing it with the per-block need is conservative for a sub-range hop (never optimistic).
    penalty = costs.cache_penalty if rec.cache_tokens_left < batch_tokens else 0.0
    return _ns(rtt + costs.per_hop_overhead + penalty), _ns(1.0 / rps)


def _forward_terms(span: ServerSpan, rtt: float, num_tokens: int, costs: RoutingCosts) -> tuple[int, int]:
    """(fixed cost per hop, cost per block) of a forward pass of ``num_tokens`` tokens on ``span``, in ns."""
    rec = span.record
    rps = rec.forward_rps if rec.forward_rps > 0 else costs.default_forward_rps
    # Hidden states cross the server's link twice (in and out); unmeasured links (0) are not charged.
    transfer = 2.0 * num_tokens / rec.network_rps if rec.network_rps > 0 else 0.0
    return _ns(rtt + costs.per_hop_overhead + transfer), _ns(num_tokens / rps)


# --- candidate selection ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    peer: str
    start: int  # span clipped to the requested range
    end: int
    fixed: int  # ns
    per_block: int  # ns


def _check_range(snapshot: SwarmSnapshot, start: int, end: int) -> None:
    if not 0 <= start <= end <= snapshot.num_blocks:
        raise ValueError(f"invalid block range {start}:{end} for a model of {snapshot.num_blocks} blocks")


def _usable_spans(
    snapshot: SwarmSnapshot, start: int, end: int, banned: Collection[str], needs: RouteRequirements
) -> list[ServerSpan]:
    """Online, non-banned servers overlapping [start, end) that can serve ``needs``; raises if blocks lack one.

    The ``MissingBlocksError`` lists the servers left out as unsuitable (``unsuitable``), so the caller can tell
    "nobody holds these blocks" (wait) from "only servers that can never serve this request hold them" (fail).
    """
    banned_set = set(banned)
    usable: list[ServerSpan] = []
    unsuitable: list[Unsuitable] = []
    num_banned = 0
    for span in snapshot.servers.values():  # sorted by peer id
        if span.state is not ServerState.online or span.end <= start or span.start >= end:
            continue
        if span.peer_id in banned_set:
            num_banned += 1
            continue
        why = unsuitable_reason(span, needs)
        if why is not None:
            unsuitable.append(why)
            continue
        usable.append(span)
    covered = [False] * (end - start)
    for span in usable:
        for b in range(max(span.start, start), min(span.end, end)):
            covered[b - start] = True
    missing = [start + i for i, ok in enumerate(covered) if not ok]
    if missing:
        parts = [f"{num_banned} online server(s) banned"] if num_banned else []
        if unsuitable:
            parts.append(f"{len(unsuitable)} online server(s) cannot serve this request")
        error = MissingBlocksError(missing, ", ".join(parts))
        error.unsuitable = unsuitable
        raise error
    return usable


# --- search -----------------------------------------------------------------------------------------------------

# Heap entry: (cost ns, hops, peer, block, candidate index, entry block of the current hop).
# Client nodes use peer "" and candidate -1; peer ids are never empty, so the two kinds never tie past ``peer``.
_Entry = tuple[int, int, str, int, int, int]


def _min_cost_route(start: int, end: int, cands: Sequence[_Candidate]) -> list[RouteHop]:
    """Dijkstra described in the module docstring. Assumes every block of [start, end) is covered."""
    if start == end:
        return []
    covering: list[list[int]] = [[] for _ in range(end - start)]
    for i, c in enumerate(cands):
        for b in range(c.start, c.end):
            covering[b - start].append(i)

    best_client: dict[int, tuple[int, int]] = {start: (0, 0)}
    # client block -> (candidate, entry block) of the hop that ends there
    parent: dict[int, tuple[int, int]] = {}
    done_client: set[int] = set()
    done_inside: set[tuple[int, int]] = set()
    heap: list[_Entry] = [(0, 0, "", start, -1, -1)]
    while heap:
        cost, hops, _, block, ci, entry = heapq.heappop(heap)
        if ci < 0:  # client holds the output of block-1
            if block in done_client:
                continue
            done_client.add(block)
            if block == end:
                break
            for i in covering[block - start]:
                if (i, block + 1) in done_inside:
                    continue
                c = cands[i]
                heapq.heappush(heap, (cost + c.fixed + c.per_block, hops + 1, c.peer, block + 1, i, block))
            continue
        if (ci, block) in done_inside:
            continue
        done_inside.add((ci, block))
        c = cands[ci]
        # Leave to the client at this block (free). The first (cost, hops) popped for a block is its best.
        if block not in done_client and (block not in best_client or (cost, hops) < best_client[block]):
            best_client[block] = (cost, hops)
            parent[block] = (ci, entry)
            heapq.heappush(heap, (cost, hops, "", block, -1, -1))
        # Or run one more block on the same server.
        if block < c.end and (ci, block + 1) not in done_inside:
            heapq.heappush(heap, (cost + c.per_block, hops, c.peer, block + 1, ci, entry))

    if end not in parent:  # unreachable given full coverage; kept as a guard against future edits
        raise MissingBlocksError([end - 1], "routing found no path")
    route: list[RouteHop] = []
    block = end
    while block != start:
        ci, entry = parent[block]
        route.append(RouteHop(PeerIdStr(cands[ci].peer), entry, block))
        block = entry
    route.reverse()
    return route


def find_inference_route(
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
    """Route minimizing the expected time of one decode step over blocks [start, end).

    ``rtts``: client-measured RTT in seconds per peer id (missing -> ``costs.default_rtt``).
    ``batch_tokens``: KV cache the session needs per block (batch * max_length); servers announcing less free
    room cost ``costs.cache_penalty`` extra (still routable: their room may have grown since they announced).
    ``needs`` leaves out servers that cannot serve the request (see ``RouteRequirements``); only ONLINE,
    non-banned servers count.
    Raises ``MissingBlocksError`` naming exactly the blocks of [start, end) that no usable server holds.
    """
    _check_range(snapshot, start, end)
    usable = _usable_spans(snapshot, start, end, banned, needs)
    cands = []
    for span in usable:
        fixed, per_block = _inference_terms(span, _rtt(span.peer_id, rtts, costs), batch_tokens, costs)
        cands.append(_Candidate(span.peer_id, max(span.start, start), min(span.end, end), fixed, per_block))
    return _min_cost_route(start, end, cands)


def find_forward_route(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    rtts: Mapping[str, float],
    num_tokens: int = 1024,
    banned: Collection[str] = (),
    costs: RoutingCosts = RoutingCosts(),
    needs: RouteRequirements = RouteRequirements(),
) -> list[RouteHop]:
    """Route minimizing the time of one forward (or backward) pass of ``num_tokens`` tokens over [start, end).

    Same search as inference with ``forward_rps`` and the link's ``network_rps``; no KV cache is involved.
    Deterministic, so concurrent trainers with the same view pick the same servers; spread load by giving each
    client its own ``banned`` set or RTTs if that matters (Petals instead picks spans at random).
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    _check_range(snapshot, start, end)
    usable = _usable_spans(snapshot, start, end, banned, needs)
    cands = []
    for span in usable:
        fixed, per_block = _forward_terms(span, _rtt(span.peer_id, rtts, costs), num_tokens, costs)
        cands.append(_Candidate(span.peer_id, max(span.start, start), min(span.end, end), fixed, per_block))
    return _min_cost_route(start, end, cands)


def route_cost(
    route: Sequence[RouteHop],
    snapshot: SwarmSnapshot,
    rtts: Mapping[str, float],
    *,
    batch_tokens: int = 0,
    costs: RoutingCosts = RoutingCosts(),
    kind: Literal["inference", "forward"] = "inference",
    num_tokens: int = 1024,
) -> float:
    """Expected seconds per step (inference) or per forward pass of ``num_tokens`` (forward) along ``route``.

    Uses the same integer-nanosecond terms as the search, so it equals the optimum the search found exactly.
    Raises ValueError if a hop's peer is not in the snapshot or runs blocks outside its announced span.
    """
    total_ns = 0
    for hop in route:
        span = snapshot.servers.get(hop.peer_id)
        if span is None or not span.start <= hop.start < hop.end <= span.end:
            raise ValueError(f"hop {hop} does not match the snapshot (server gone or span changed)")
        rtt = _rtt(hop.peer_id, rtts, costs)
        if kind == "inference":
            fixed, per_block = _inference_terms(span, rtt, batch_tokens, costs)
        else:
            fixed, per_block = _forward_terms(span, rtt, num_tokens, costs)
        total_ns += fixed + hop.length * per_block
    return total_ns / 1e9


def format_route(route: Sequence[RouteHop], *, peer_chars: int = 8) -> str:
    """Compact human form for logs and the CLI: "Qm3xk1ab:0-4 -> Zp9a2bcd:4-8" (last chars of each peer id)."""
    return " -> ".join(f"{hop.peer_id[-peer_chars:]}:{hop.start}-{hop.end}" for hop in route)


# --- quantization requirement ------------------------------------------------------------------------------------

QUANT_NAMES = (
    "none",
    "int8",
    "nf4",
)  # what servers announce (models/quant.py); kept here so routing stays pure


def servers_without_quant(snapshot: SwarmSnapshot, allowed_quant: Collection[str]) -> set[str]:
    """Peer ids of servers whose announced quantization is not in ``allowed_quant`` (empty: any is allowed).

    The client adds them to the servers it routes around, so first routes and failover replacements alike keep
    the requirement.
    """
    if not allowed_quant:
        return set()
    unknown = sorted(set(allowed_quant) - set(QUANT_NAMES))
    if unknown:
        raise ValueError(
            f"unknown quantization(s) {unknown} in allowed_quant; choose from {', '.join(QUANT_NAMES)}"
        )
    allowed = set(allowed_quant)
    return {peer for peer, span in snapshot.servers.items() if span.record.quant not in allowed}
