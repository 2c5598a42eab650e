"""Routing for pushed inference: server-to-server legs priced by the servers' announced RTTs (pure)."""

from __future__ import annotations

import pytest

from potluck.swarm.push_routing import find_push_route, server_link_seconds
from potluck.swarm.routing import MissingBlocksError, RouteHop, RoutingCosts, find_inference_route
from swarm_records import rec, snap

PEERS = {"a": "12D3KooWa", "b": "12D3KooWb", "c": "12D3KooWc"}


def test_announced_server_rtts_choose_the_next_hop() -> None:
    # a holds 0:4; b and c both hold 4:8. The client is equally close to b and c, but a announces that c is far
    # from it: with push the a -> c leg is paid, so b wins (relay routing cannot tell them apart).
    a, b, c = PEERS["a"], PEERS["b"], PEERS["c"]
    s = snap(8, **{a: rec(0, 4, next_pings={b: 0.010, c: 0.400}), b: rec(4, 8), c: rec(4, 8)})
    rtts = {a: 0.05, b: 0.05, c: 0.05}
    assert find_push_route(s, 0, 8, rtts=rtts, batch_tokens=1) == [RouteHop(a, 0, 4), RouteHop(b, 4, 8)]
    s2 = snap(8, **{a: rec(0, 4, next_pings={b: 0.400, c: 0.010}), b: rec(4, 8), c: rec(4, 8)})
    assert find_push_route(s2, 0, 8, rtts=rtts, batch_tokens=1) == [RouteHop(a, 0, 4), RouteHop(c, 4, 8)]


def test_unmeasured_links_are_estimated_through_the_client_and_match_relay_choices() -> None:
    a, b, c = PEERS["a"], PEERS["b"], PEERS["c"]
    s = snap(8, **{a: rec(0, 4), b: rec(4, 8), c: rec(0, 8, inference_rps=10.0)})
    rtts = {a: 0.02, b: 0.02, c: 0.02}
    costs = RoutingCosts()
    assert server_link_seconds(s, a, b, rtts, costs) == pytest.approx(0.01)  # (0.02 + 0.02) / 4
    pushed = find_push_route(s, 0, 8, rtts=rtts, batch_tokens=1)
    assert pushed == find_inference_route(s, 0, 8, rtts=rtts, batch_tokens=1)
    with pytest.raises(MissingBlocksError):
        find_push_route(s, 0, 8, rtts=rtts, batch_tokens=1, banned={a, c})
