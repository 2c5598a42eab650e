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

from potluck.swarm.records import PeerIdStr, ServerSpan, ServerState, SwarmSnapshot


class MissingBlocksError(RuntimeError):
    """No usable server holds some of the requested blocks (``missing``, ascending)."""

    def __init__(self, missing: Sequence[int], detail: str = "") -> None:
        self.missing: list[int] = sorted(set(missing))
        self.detail = detail
        msg = f"no online server holds blocks {format_block_ranges(self.missing)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)

    def __reduce__(self) -> tuple[type[MissingBlocksError], tuple[list[int], str]]:
        # Custom __init__ args: make it survive pickling (multiprocessing, asyncio executors).
        return (type(self), (self.missing, self.detail))


def format_block_ranges(blocks: Sequence[int]) -> str:
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
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    banned: Collection[str],
    *,
    adapter: str | None = None,
    max_length: int | None = None,
) -> list[ServerSpan]:
    """Online, non-banned servers overlapping [start, end) that can serve the request; raises if blocks lack one."""
    banned_set = set(banned)
    usable: list[ServerSpan] = []
    excluded = 0
    for span in snapshot.servers.values():  # sorted by peer id
        if span.state is not ServerState.online or span.end <= start or span.start >= end:
            continue
        rec = span.record
        if (
            span.peer_id in banned_set
            or (adapter is not None and adapter not in rec.adapters)
            or (max_length is not None and rec.max_inference_length < max_length)
        ):
            excluded += 1
            continue
        usable.append(span)
    covered = [False] * (end - start)
    for span in usable:
        for b in range(max(span.start, start), min(span.end, end)):
            covered[b - start] = True
    missing = [start + i for i, ok in enumerate(covered) if not ok]
    if missing:
        detail = f"{excluded} online server(s) excluded as banned or unsuitable" if excluded else ""
        raise MissingBlocksError(missing, detail)
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
    adapter: str | None = None,
    max_length: int | None = None,
) -> list[RouteHop]:
    """Route minimizing the expected time of one decode step over blocks [start, end).

    ``rtts``: client-measured RTT in seconds per peer id (missing -> ``costs.default_rtt``).
    ``batch_tokens``: KV cache the session needs per block (batch * max_length); servers announcing less free
    room cost ``costs.cache_penalty`` extra (still routable: their room may have grown since they announced).
    ``adapter`` keeps only servers offering that LoRA adapter; ``max_length`` drops servers whose
    ``max_inference_length`` is smaller (they would refuse the session). Only ONLINE, non-banned servers count.
    Raises ``MissingBlocksError`` naming exactly the blocks of [start, end) that no usable server holds.
    """
    _check_range(snapshot, start, end)
    usable = _usable_spans(snapshot, start, end, banned, adapter=adapter, max_length=max_length)
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
    adapter: str | None = None,
) -> list[RouteHop]:
    """Route minimizing the time of one forward (or backward) pass of ``num_tokens`` tokens over [start, end).

    Same search as inference with ``forward_rps`` and the link's ``network_rps``; no KV cache is involved.
    Deterministic, so concurrent trainers with the same view pick the same servers; spread load by giving each
    client its own ``banned`` set or RTTs if that matters (Petals instead picks spans at random).
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    _check_range(snapshot, start, end)
    usable = _usable_spans(snapshot, start, end, banned, adapter=adapter)
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
