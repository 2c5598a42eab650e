"""Tests for routing (pure, no network)."""

from __future__ import annotations

import pickle
import random
import time
from typing import Any

import pytest

from potluck.errors import LimitExceededError, ModelMismatchError, UnknownAdapterError
from potluck.swarm.records import PeerIdStr, ServerRecord, ServerState, SwarmSnapshot
from potluck.swarm.routing import (
    MissingBlocksError,
    RouteHop,
    RouteRequirements,
    RoutingCosts,
    Unsuitable,
    find_forward_route,
    find_inference_route,
    format_block_ranges,
    format_route,
    route_cost,
    unservable_blocks_error,
    unsuitable_reason,
)
from swarm_records import rec, snap

# Costs with round numbers so expected routes are easy to reason about.
COSTS = RoutingCosts(
    default_rtt=0.05, per_hop_overhead=0.002, default_inference_rps=100.0, cache_penalty=10.0
)


def hops(route: list[RouteHop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route]


def route(
    s: SwarmSnapshot, start: int, end: int, rtts: dict[str, float] | None = None, **kw: Any
) -> list[RouteHop]:
    kw.setdefault("batch_tokens", 1024)
    kw.setdefault("costs", COSTS)
    return find_inference_route(s, start, end, rtts=rtts or {}, **kw)


def test_single_server_covering_all() -> None:
    s = snap(8, a=rec(0, 8))
    r = route(s, 0, 8)
    assert hops(r) == [("a", 0, 8)] and r[0].length == 8
    assert route_cost(r, s, {}, batch_tokens=1024, costs=COSTS) == pytest.approx(0.05 + 0.002 + 8 / 100)


def test_two_servers_chain() -> None:
    s = snap(8, a=rec(0, 4), b=rec(4, 8))
    assert hops(route(s, 0, 8)) == [("a", 0, 4), ("b", 4, 8)]


def test_empty_range_and_bad_range() -> None:
    s = snap(8, a=rec(0, 8))
    assert route(s, 3, 3) == []
    for start, end in [(-1, 3), (4, 2), (0, 9)]:
        with pytest.raises(ValueError):
            route(s, start, end)


def test_overlapping_servers_choose_the_faster() -> None:
    s = snap(8, slow=rec(0, 8, inference_rps=20.0), fast=rec(0, 8, inference_rps=200.0))
    assert hops(route(s, 0, 8)) == [("fast", 0, 8)]
    # Same compute, lower RTT wins.
    s = snap(8, far=rec(0, 8), near=rec(0, 8))
    assert hops(route(s, 0, 8, {"far": 0.3, "near": 0.01})) == [("near", 0, 8)]
    assert hops(route(s, 0, 8, {"far": 0.01, "near": 0.3})) == [("far", 0, 8)]


def test_one_hop_beats_two_when_rtt_dominates() -> None:
    # A full-span server vs two halves that are slightly faster at compute but cost an extra RTT.
    s = snap(
        8,
        whole=rec(0, 8, inference_rps=100.0),
        h1=rec(0, 4, inference_rps=200.0),
        h2=rec(4, 8, inference_rps=200.0),
    )
    assert hops(route(s, 0, 8, {"whole": 0.05, "h1": 0.05, "h2": 0.05})) == [("whole", 0, 8)]
    # With negligible RTT the faster halves win.
    cheap = RoutingCosts(default_rtt=0.0, per_hop_overhead=0.0)
    assert hops(route(s, 0, 8, {"whole": 0.0, "h1": 0.0, "h2": 0.0}, costs=cheap)) == [
        ("h1", 0, 4),
        ("h2", 4, 8),
    ]


def test_equal_cost_prefers_fewer_hops() -> None:
    # rtt = overhead = 0 and rps = 4 make both routes cost exactly 2.0 s.
    costs = RoutingCosts(default_rtt=0.0, per_hop_overhead=0.0)
    s = snap(
        8, a=rec(0, 4, inference_rps=4.0), b=rec(4, 8, inference_rps=4.0), z=rec(0, 8, inference_rps=4.0)
    )
    r = route(s, 0, 8, costs=costs)
    assert hops(r) == [("z", 0, 8)]
    assert route_cost(r, s, {}, costs=costs) == 2.0


def test_sub_range_of_a_span() -> None:
    s = snap(8, x=rec(1, 3), y=rec(3, 4))
    assert hops(route(s, 2, 4)) == [("x", 2, 3), ("y", 3, 4)]
    # A server may also be left early when a faster one takes over.
    s = snap(8, long=rec(0, 8, inference_rps=10.0), quick=rec(4, 8, inference_rps=1000.0))
    assert hops(route(s, 0, 8)) == [("long", 0, 4), ("quick", 4, 8)]


def test_banned_peers_avoided() -> None:
    s = snap(8, a=rec(0, 8), b=rec(0, 8, inference_rps=10.0))
    assert hops(route(s, 0, 8)) == [("a", 0, 8)]
    assert hops(route(s, 0, 8, banned={"a"})) == [("b", 0, 8)]
    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 8, banned=["a", "b"])
    assert exc.value.missing == list(range(8))
    assert "0-7" in str(exc.value) and "2 online server(s) banned" in str(exc.value)


def test_cache_penalty_prefers_a_server_with_room() -> None:
    s = snap(
        8,
        full=rec(0, 8, inference_rps=1000.0, cache_tokens_left=100),
        roomy=rec(0, 8, cache_tokens_left=4096),
    )
    assert hops(route(s, 0, 8, batch_tokens=2048)) == [("roomy", 0, 8)]
    assert hops(route(s, 0, 8, batch_tokens=64)) == [("full", 0, 8)]  # enough room: the faster one
    # If the full server is the only option it is still used (its room may have grown since it announced).
    only = snap(8, full=rec(0, 8, cache_tokens_left=100))
    r = route(only, 0, 8, batch_tokens=2048)
    assert hops(r) == [("full", 0, 8)]
    assert route_cost(r, only, {}, batch_tokens=2048, costs=COSTS) > COSTS.cache_penalty


def test_offline_and_joining_ignored() -> None:
    s = snap(
        8,
        off=rec(0, 8, state=ServerState.offline, inference_rps=1e6),
        join=rec(0, 8, state=ServerState.joining, inference_rps=1e6),
        on=rec(0, 8),
    )
    assert hops(route(s, 0, 8)) == [("on", 0, 8)]
    s = snap(8, off=rec(0, 8, state=ServerState.offline), join=rec(0, 8, state=ServerState.joining))
    with pytest.raises(MissingBlocksError):
        route(s, 0, 8)


def test_missing_blocks_error_names_them() -> None:
    s = snap(10, a=rec(0, 3), b=rec(6, 7), c=rec(8, 10))
    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 10)
    assert exc.value.missing == [3, 4, 5, 7]
    assert str(exc.value) == "no online server holds blocks 3-5, 7"
    # Only blocks inside the requested range are reported.
    with pytest.raises(MissingBlocksError) as exc:
        route(s, 4, 7)
    assert exc.value.missing == [4, 5]
    assert hops(route(s, 0, 3)) == [("a", 0, 3)]
    # Survives pickling (crosses process boundaries).
    again = pickle.loads(pickle.dumps(exc.value))
    assert again.missing == [4, 5] and str(again) == str(exc.value)
    with pytest.raises(MissingBlocksError):
        find_forward_route(s, 0, 10, rtts={})


def test_format_helpers() -> None:
    assert format_block_ranges([]) == ""
    assert format_block_ranges([7, 3, 4, 5]) == "3-5, 7"
    assert format_block_ranges([1, 2, 9, 10, 11, 20]) == "1-2, 9-11, 20"
    r = [RouteHop(PeerIdStr("QmAAAAbbbbcccc"), 0, 4), RouteHop(PeerIdStr("QmZZ"), 4, 8)]
    assert format_route(r) == "bbbbcccc:0-4 -> QmZZ:4-8"


def test_adapter_and_max_length_filters() -> None:
    s = snap(
        4,
        plain=rec(0, 4, inference_rps=1000.0),
        lora=rec(0, 4, adapters=("org/lora",)),
        short=rec(0, 4, max_inference_length=512),
    )
    assert hops(route(s, 0, 4)) == [("plain", 0, 4)]
    assert hops(route(s, 0, 4, needs=RouteRequirements(adapter="org/lora"))) == [("lora", 0, 4)]
    with pytest.raises(MissingBlocksError):
        route(s, 0, 4, needs=RouteRequirements(adapter="org/other"))
    s = snap(4, short=rec(0, 4, max_inference_length=512, inference_rps=1000.0), long=rec(0, 4))
    assert hops(route(s, 0, 4)) == [("short", 0, 4)]
    assert hops(route(s, 0, 4, needs=RouteRequirements(max_length=2048))) == [("long", 0, 4)]


def test_requirements_filter_each_need_and_forward_routes_too() -> None:
    """Every requirement leaves out exactly the servers that cannot serve it, on both kinds of route."""
    s = snap(
        8,
        fast=rec(0, 8, inference_rps=1000.0, forward_rps=10_000.0, fingerprint="aa.bb", max_batch_tokens=256),
        lora=rec(0, 4, adapters=("ad",), fingerprint="aa.bb"),
        lora2=rec(4, 8, adapters=("ad",)),  # announces no fingerprint (an older server): accepted
        other=rec(0, 8, fingerprint="aa.cc", inference_rps=5000.0, forward_rps=50_000.0),
    )
    assert hops(route(s, 0, 8)) == [("other", 0, 8)]  # nothing required: the fastest
    needs = RouteRequirements(fingerprint="aa.bb")
    assert hops(route(s, 0, 8, needs=needs)) == [("fast", 0, 8)]
    assert hops(find_forward_route(s, 0, 8, rtts={}, needs=needs)) == [("fast", 0, 8)]
    needs = RouteRequirements(fingerprint="aa.bb", batch_tokens=1024)  # above fast's max_batch_tokens
    assert hops(find_forward_route(s, 0, 8, rtts={}, needs=needs)) == [("lora", 0, 4), ("lora2", 4, 8)]
    needs = RouteRequirements(fingerprint="aa.bb", adapter="ad")
    assert hops(route(s, 0, 8, needs=needs)) == [("lora", 0, 4), ("lora2", 4, 8)]
    assert unsuitable_reason(s.servers[PeerIdStr("other")], needs) == Unsuitable(
        "other", 0, 8, "model_mismatch", "server fingerprint aa.cc, client fingerprint aa.bb"
    )
    assert unsuitable_reason(s.servers[PeerIdStr("lora")], needs) is None


def test_unservable_blocks_become_the_deterministic_error() -> None:
    """Blocks held only by unsuitable servers are a RequestError at once; unheld blocks stay a wait."""
    s = snap(8, a=rec(0, 4, fingerprint="11.22"), b=rec(4, 8, fingerprint="11.33", max_inference_length=64))
    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 8, needs=RouteRequirements(fingerprint="11.22"))
    assert exc.value.missing == [4, 5, 6, 7] and "cannot serve" in str(exc.value)
    fatal = unservable_blocks_error(exc.value)
    assert isinstance(fatal, ModelMismatchError)
    assert "11.33" in str(fatal) and "11.22" in str(fatal) and "server b" in str(fatal)

    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 8, needs=RouteRequirements(max_length=128))
    fatal = unservable_blocks_error(exc.value)
    assert isinstance(fatal, LimitExceededError) and "max_inference_length 64" in str(fatal)

    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 8, needs=RouteRequirements(adapter="x"))
    assert isinstance(unservable_blocks_error(exc.value), UnknownAdapterError)

    # block 4-7's only holder is banned: nobody usable holds them, so waiting may help (no deterministic error)
    with pytest.raises(MissingBlocksError) as exc:
        route(s, 0, 8, banned={"b"}, needs=RouteRequirements(adapter="x"))
    assert unservable_blocks_error(exc.value) is None
    # blocks held by nobody at all: no deterministic error either
    with pytest.raises(MissingBlocksError) as exc:
        route(snap(8, a=rec(0, 4, adapters=("y",))), 0, 8, needs=RouteRequirements(adapter="x"))
    assert unservable_blocks_error(exc.value) is None


def test_rtt_sanitizing() -> None:
    s = snap(4, a=rec(0, 4), b=rec(0, 4))
    # inf is capped (still routable), nan counts as unmeasured.
    assert hops(route(s, 0, 4, {"a": float("inf"), "b": 1.0})) == [("b", 0, 4)]
    assert hops(route(s, 0, 4, {"a": float("nan"), "b": 1.0})) == [("a", 0, 4)]
    only = snap(4, a=rec(0, 4))
    assert hops(route(only, 0, 4, {"a": float("inf")})) == [("a", 0, 4)]
    assert route_cost(route(only, 0, 4), only, {"a": float("inf")}, costs=COSTS) == pytest.approx(
        5.0 + 0.002 + 0.04
    )


def test_unmeasured_rps_uses_default() -> None:
    s = snap(4, zero=rec(0, 4, inference_rps=0.0), slow=rec(0, 4, inference_rps=50.0))
    assert hops(route(s, 0, 4)) == [("zero", 0, 4)]  # default 100 rps beats 50


def test_forward_route_uses_forward_rps_and_network() -> None:
    s = snap(
        8,
        decode=rec(0, 8, inference_rps=1000.0, forward_rps=100.0),
        prefill=rec(0, 8, inference_rps=10.0, forward_rps=5000.0),
    )
    assert hops(route(s, 0, 8)) == [("decode", 0, 8)]
    fr = find_forward_route(s, 0, 8, rtts={}, num_tokens=512, costs=COSTS)
    assert hops(fr) == [("prefill", 0, 8)]
    cost = route_cost(fr, s, {}, kind="forward", num_tokens=512, costs=COSTS)
    assert cost == pytest.approx(0.05 + 0.002 + 8 * 512 / 5000)
    # A thin link makes a fast server lose for big batches.
    s = snap(
        8,
        thin=rec(0, 8, forward_rps=5000.0, network_rps=100.0),
        fat=rec(0, 8, forward_rps=2000.0, network_rps=1e6),
    )
    assert hops(find_forward_route(s, 0, 8, rtts={}, num_tokens=1024, costs=COSTS)) == [("fat", 0, 8)]
    with pytest.raises(ValueError):
        find_forward_route(s, 0, 8, rtts={}, num_tokens=0)


def test_route_cost_rejects_stale_routes() -> None:
    s = snap(8, a=rec(0, 4))
    with pytest.raises(ValueError):
        route_cost([RouteHop("gone", 0, 4)], s, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        route_cost([RouteHop("a", 0, 5)], s, {})  # type: ignore[arg-type]


def random_swarm(rng: random.Random, num_servers: int, num_blocks: int) -> dict[str, ServerRecord]:
    servers: dict[str, ServerRecord] = {}
    for i in range(num_servers):
        length = rng.randint(1, num_blocks // 2)
        start = rng.randint(0, num_blocks - length)
        state = rng.choice([ServerState.online] * 8 + [ServerState.joining, ServerState.offline])
        servers[f"peer{i:05d}-{rng.randrange(10**6)}"] = rec(
            start,
            start + length,
            state=state,
            inference_rps=float(rng.choice([5, 20, 50, 100, 400])),
            forward_rps=float(rng.choice([500, 1000, 5000])),
            cache_tokens_left=rng.choice([0, 1024, 65536]),
        )
    return servers


def test_determinism_regardless_of_dict_order() -> None:
    rng = random.Random(7)
    servers = random_swarm(rng, 60, 24)
    rtts = {pid: rng.choice([0.01, 0.05, 0.2]) for pid in servers}
    items = list(servers.items())
    results = set()
    for seed in range(5):
        random.Random(seed).shuffle(items)
        rtt_items = list(rtts.items())
        random.Random(seed + 100).shuffle(rtt_items)
        s = SwarmSnapshot.from_records("m", 24, dict(items), now=0.0)
        r = find_inference_route(s, 0, 24, rtts=dict(rtt_items), batch_tokens=2048, costs=COSTS)
        results.add(tuple(hops(r)))
    assert len(results) == 1


def check_route(r: list[RouteHop], s: SwarmSnapshot, start: int, end: int, banned: set[str]) -> None:
    assert r and r[0].start == start and r[-1].end == end
    for prev, nxt in zip(r, r[1:], strict=False):
        assert prev.end == nxt.start
    for h in r:
        span = s.servers[h.peer_id]
        assert span.state is ServerState.online and h.peer_id not in banned
        assert span.start <= h.start < h.end <= span.end


def brute_force_cost(
    s: SwarmSnapshot, start: int, end: int, rtts: dict[str, float], batch_tokens: int
) -> float:
    """O(blocks^2 * servers) DP over boundaries: the reference for the Dijkstra search."""
    best = [float("inf")] * (end + 1)
    best[start] = 0.0
    for b in range(start, end):
        for span in s.servers.values():
            if span.state is not ServerState.online or not span.start <= b < span.end:
                continue
            for e in range(b + 1, min(span.end, end) + 1):
                hop = [RouteHop(span.peer_id, b, e)]
                c = best[b] + route_cost(hop, s, rtts, batch_tokens=batch_tokens, costs=COSTS)
                best[e] = min(best[e], c)
    return best[end]


def test_matches_brute_force_on_small_random_swarms() -> None:
    rng = random.Random(3)
    for _ in range(30):
        nb = rng.randint(2, 10)
        servers = random_swarm(rng, rng.randint(3, 12), max(nb, 2))
        s = SwarmSnapshot.from_records("m", nb, servers, now=0.0)
        rtts = {pid: rng.choice([0.0, 0.01, 0.1]) for pid in servers}
        start = rng.randrange(nb)
        end = rng.randint(start + 1, nb)
        try:
            r = find_inference_route(s, start, end, rtts=rtts, batch_tokens=1024, costs=COSTS)
        except MissingBlocksError as e:
            online = s.coverage()
            assert e.missing == [b for b in range(start, end) if online[b] == 0]
            continue
        check_route(r, s, start, end, set())
        got = route_cost(r, s, rtts, batch_tokens=1024, costs=COSTS)
        assert got == pytest.approx(brute_force_cost(s, start, end, rtts, 1024), rel=1e-9, abs=1e-12)


def test_scale_1000_servers_80_blocks() -> None:
    rng = random.Random(42)
    servers = random_swarm(rng, 1000, 80)
    s = SwarmSnapshot.from_records("m", 80, servers, now=0.0)
    rtts = {pid: rng.uniform(0.001, 0.3) for pid in servers}
    banned = set(rng.sample(sorted(servers), 50))
    t0 = time.perf_counter()
    r = find_inference_route(s, 0, 80, rtts=rtts, batch_tokens=4096, banned=banned, costs=COSTS)
    t_inf = time.perf_counter() - t0
    t0 = time.perf_counter()
    fr = find_forward_route(s, 0, 80, rtts=rtts, num_tokens=1024, banned=banned, costs=COSTS)
    t_fwd = time.perf_counter() - t0
    print(
        f"\n1000 servers x 80 blocks: inference route {t_inf * 1e3:.1f} ms ({len(r)} hops), forward {t_fwd * 1e3:.1f} ms ({len(fr)} hops)"
    )
    check_route(r, s, 0, 80, banned)
    check_route(fr, s, 0, 80, banned)
