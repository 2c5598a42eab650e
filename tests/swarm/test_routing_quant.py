"""The client's quantization requirement (``allowed_quant``) in routing (pure, no network)."""

from __future__ import annotations

import pytest

from potluck.swarm.records import parse_record, record_to_dht
from potluck.swarm.routing import MissingBlocksError, find_inference_route, servers_without_quant
from swarm_records import rec, snap


def _route(s, banned):  # type: ignore[no-untyped-def]
    return [
        (h.peer_id, h.start, h.end)
        for h in find_inference_route(s, 0, 4, rtts={}, batch_tokens=1, banned=banned)
    ]


def test_allowed_quant_filters_servers_and_failover_keeps_it() -> None:
    # the fast int8 server would win on cost; the client only accepts nf4 / none
    s = snap(
        4,
        a=rec(0, 4, quant="nf4", inference_rps=50.0),
        b=rec(0, 4, quant="int8", inference_rps=500.0),
        c=rec(0, 4, quant="none", inference_rps=20.0),
    )
    assert servers_without_quant(s, ()) == set()
    excluded = servers_without_quant(s, ("nf4", "none"))
    assert excluded == {"b"}
    assert _route(s, excluded) == [("a", 0, 4)]
    # failover: "a" failed and is banned; the replacement is "c", not the faster int8 "b"
    assert _route(s, excluded | {"a"}) == [("c", 0, 4)]
    with pytest.raises(MissingBlocksError):
        find_inference_route(
            s, 0, 4, rtts={}, batch_tokens=1, banned=servers_without_quant(s, ("nf4",)) | {"a"}
        )


def test_unknown_quant_in_requirement_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown quantization"):
        servers_without_quant(snap(1, a=rec(0, 1)), ("int4",))


def test_records_carry_quant_and_block_bytes_and_default_for_older_servers() -> None:
    r = rec(0, 2, quant="nf4", block_bytes=123456)
    back = parse_record(record_to_dht(r))
    assert back is not None and (back.quant, back.block_bytes) == ("nf4", 123456)
    old = record_to_dht(rec(0, 2))
    assert isinstance(old, dict)
    old.pop("quant", None)
    old.pop("block_bytes", None)
    parsed = parse_record(old)
    assert parsed is not None and (parsed.quant, parsed.block_bytes) == ("none", 0)
    assert parse_record({**record_to_dht(r), "block_bytes": -1}) is None  # hostile values are dropped
