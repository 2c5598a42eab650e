"""Tests for DHT records and swarm snapshots (pure, no network)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from potluck.swarm.records import (
    PeerIdStr,
    ServerRecord,
    ServerSpan,
    ServerState,
    SwarmSnapshot,
    block_key,
    model_prefix_for,
    parse_record,
    record_to_dht,
)


def make_record(start: int = 0, end: int = 4, **overrides: Any) -> ServerRecord:
    fields: dict[str, Any] = dict(
        state=ServerState.online,
        start=start,
        end=end,
        throughput=100.0,
        inference_rps=50.0,
        forward_rps=2000.0,
        network_rps=10000.0,
        cache_tokens_left=8192,
        max_inference_length=2048,
        dtype="bfloat16",
        version="0.1.0",
    )
    fields.update(overrides)
    return ServerRecord(**fields)


def raw(start: int = 0, end: int = 4, **overrides: Any) -> dict[str, Any]:
    return record_to_dht(make_record(start, end, **overrides))


# --- records -------------------------------------------------------------------------------------------------


def test_round_trip_minimal_and_full() -> None:
    rec = make_record()
    assert parse_record(record_to_dht(rec)) == rec
    full = make_record(
        public_name="alice", adapters=("org/lora-a", "org/lora-b"), next_pings={"QmNext": 0.012}
    )
    dumped = record_to_dht(full)
    assert parse_record(dumped) == full
    assert dumped["state"] == "online"
    assert dumped["adapters"] == ["org/lora-a", "org/lora-b"]  # JSON-able: tuples become lists
    assert parse_record(json.dumps(dumped)) == full  # JSON text accepted too
    assert parse_record(json.dumps(dumped).encode()) == full


def test_capabilities_round_trip_and_default_to_unannounced() -> None:
    full = parse_record(raw() | {"fingerprint": "0123abcd.ffee", "max_batch_tokens": 2048})
    assert full is not None and full.fingerprint == "0123abcd.ffee" and full.max_batch_tokens == 2048
    old = parse_record(raw())  # an older server's record: nothing announced, accepted by every requirement
    assert old is not None and old.fingerprint is None and old.max_batch_tokens == 0


def test_record_to_dht_is_compact() -> None:
    dumped = record_to_dht(make_record())
    assert "public_name" not in dumped and "adapters" not in dumped and "next_pings" not in dumped
    json.dumps(dumped)  # JSON-able


def test_record_is_frozen() -> None:
    rec = make_record()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen models
        rec.start = 3  # type: ignore[misc]


def test_extra_unknown_fields_are_accepted() -> None:
    value = raw() | {"gpu": "H100", "future_field": {"nested": [1, 2]}}
    rec = parse_record(value)
    assert rec is not None and rec.start == 0 and rec.end == 4


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r | {"start": "0"},  # wrong type: no str -> int coercion
        lambda r: r | {"start": True},  # bools are not ints here
        lambda r: r | {"start": 1.0},
        lambda r: r | {"start": -1},
        lambda r: r | {"start": 4, "end": 4},  # empty span
        lambda r: r | {"start": 5, "end": 4},  # reversed span
        lambda r: r | {"end": 10**9},  # absurd span
        lambda r: r | {"throughput": -1.0},
        lambda r: r | {"inference_rps": float("nan")},
        lambda r: r | {"forward_rps": float("inf")},
        lambda r: r | {"cache_tokens_left": -5},
        lambda r: r | {"state": "draining"},  # unknown state
        lambda r: r | {"state": 2},  # Petals' numeric states are not ours
        lambda r: r | {"public_name": "x" * 10_000},  # huge string
        lambda r: r | {"version": "v" * 1000},
        lambda r: r | {"dtype": ""},
        lambda r: r | {"adapters": ["a"] * 1000},
        lambda r: r | {"adapters": [1, 2]},
        lambda r: r | {"next_pings": {f"peer{i}": 0.1 for i in range(1000)}},
        lambda r: r | {"next_pings": {"peer": -0.1}},
        lambda r: r | {"next_pings": {"peer": "fast"}},
        lambda r: r | {"fingerprint": "not-hex.zz"},
        lambda r: r | {"fingerprint": "ab" * 100 + ".cd"},  # huge
        lambda r: r | {"max_batch_tokens": -1},
        lambda r: {k: v for k, v in r.items() if k != "throughput"},  # missing required field
    ],
)
def test_malformed_values_are_ignored(mutate: Any) -> None:
    assert parse_record(mutate(raw())) is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        3.5,
        [1, 2, 3],
        ("online", 1.0),
        "not json",
        b"\xff\xfe",
        "{}",
        "x" * 1_000_000,
        object(),
        {1: 2},
    ],
)
def test_non_record_values_are_ignored(value: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="potluck.swarm.records"):
        assert parse_record(value) is None


def test_block_key_and_model_prefix() -> None:
    assert block_key("Llama-2-7b-hf", 0) == "Llama-2-7b-hf.0"
    assert block_key("m", 31) == "m.31"
    with pytest.raises(ValueError):
        block_key("m", -1)
    assert model_prefix_for("meta-llama/Llama-2-7b-hf") == "Llama-2-7b-hf"
    assert model_prefix_for("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2-5-0-5B-Instruct"
    assert model_prefix_for("/data/models/Qwen2.5-0.5B/") == "Qwen2-5-0-5B"
    assert model_prefix_for("C:\\models\\tiny.llama") == "tiny-llama"
    assert model_prefix_for("gpt2") == "gpt2"
    assert model_prefix_for("meta-llama/Llama-2-7b-hf", override="_private-llama") == "_private-llama"
    for bad in ("has.dot", "", "sp ace", "x" * 500):
        with pytest.raises(ValueError):
            model_prefix_for("any/model", override=bad)
    with pytest.raises(ValueError):
        model_prefix_for("/")


# --- snapshots -----------------------------------------------------------------------------------------------


def entries_for(records: dict[str, dict[str, Any]], num_blocks: int) -> dict[int, dict[str, object]]:
    """Lay records out as the DHT would: each under every block of its span."""
    entries: dict[int, dict[str, object]] = {b: {} for b in range(num_blocks)}
    for peer, value in records.items():
        for b in range(value["start"], value["end"]):
            entries[b][peer] = value
    return entries


def test_snapshot_from_entries_coverage_and_missing() -> None:
    records = {
        "peerA": raw(0, 4),
        "peerB": raw(2, 6, state="joining", throughput=10.0),
        "peerC": raw(6, 8, state="offline"),
        "peerD": raw(3, 5, throughput=1.0),
    }
    entries = entries_for(records, 10)
    entries[7]["peerJunk"] = {"garbage": True}
    entries[8]["peerBad"] = "not a record"
    snap = SwarmSnapshot.from_block_entries("m", 10, entries, now=123.0)

    assert list(snap.servers) == ["peerA", "peerB", "peerC", "peerD"]  # junk dropped, sorted
    assert snap.taken_at == 123.0 and snap.model_prefix == "m"
    a = snap.servers[PeerIdStr("peerA")]
    assert isinstance(a, ServerSpan) and (a.start, a.end, a.length) == (0, 4, 4)
    assert snap.coverage() == [1, 1, 1, 2, 1, 0, 0, 0, 0, 0]
    assert snap.missing_blocks() == [5, 6, 7, 8, 9]
    assert snap.missing_blocks(states=(ServerState.online, ServerState.joining)) == [6, 7, 8, 9]
    # Placement counts online + joining, not offline.
    assert snap.block_throughputs() == [100.0, 100.0, 110.0, 111.0, 11.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    assert [s.peer_id for s in snap.servers_for_block(3)] == ["peerA", "peerD"]
    assert [s.peer_id for s in snap.servers_for_block(3, states=tuple(ServerState))] == [
        "peerA",
        "peerB",
        "peerD",
    ]

    smaller = snap.without(["peerA", "nobody"])
    assert list(smaller.servers) == ["peerB", "peerC", "peerD"]
    assert smaller.coverage() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert list(snap.servers) == ["peerA", "peerB", "peerC", "peerD"]  # original untouched


def test_snapshot_drops_inconsistent_records() -> None:
    entries: dict[int, dict[str, object]] = {
        0: {"outside": raw(2, 4)},  # found under a block its span does not contain
        1: {"toolong": raw(1, 50)},  # span beyond the model
        -1: {"neg": raw(0, 1)},
        99: {"far": raw(0, 1)},
        2: {"": raw(2, 3), "x" * 500: raw(2, 3)},  # invalid peer ids
    }
    snap = SwarmSnapshot.from_block_entries("m", 8, entries, now=0.0)
    assert dict(snap.servers) == {}
    assert snap.missing_blocks() == list(range(8))


def test_snapshot_order_independent() -> None:
    records = {f"peer{i}": raw(i, i + 3) for i in range(5)}
    entries = entries_for(records, 8)
    shuffled = {b: dict(reversed(list(entries[b].items()))) for b in reversed(list(entries))}
    a = SwarmSnapshot.from_block_entries("m", 8, entries, now=0.0)
    b = SwarmSnapshot.from_block_entries("m", 8, shuffled, now=0.0)
    assert list(a.servers.items()) == list(b.servers.items())


def test_disagreeing_records_prefer_the_one_that_overwrote_the_other() -> None:
    # The server held 0:6 and moved to 4:6: new records overwrote blocks 4-5, stale ones linger on 0-3.
    old, new = raw(0, 6), raw(4, 6, throughput=7.0)
    entries: dict[int, dict[str, object]] = {b: {"peer": old} for b in range(4)}
    entries |= {4: {"peer": new}, 5: {"peer": new}}
    snap = SwarmSnapshot.from_block_entries("m", 6, entries, now=0.0)
    rec = snap.servers[PeerIdStr("peer")].record
    assert (rec.start, rec.end, rec.throughput) == (4, 6, 7.0)

    # Moved 2:6 -> 0:4: new on 0-3, old lingers on 4-5.
    old, new = raw(2, 6), raw(0, 4)
    entries = {0: {"p": new}, 1: {"p": new}, 2: {"p": new}, 3: {"p": new}, 4: {"p": old}, 5: {"p": old}}
    rec = SwarmSnapshot.from_block_entries("m", 6, entries, now=0.0).servers[PeerIdStr("p")].record
    assert (rec.start, rec.end) == (0, 4)

    # Same span, replicas disagree on a field: no order can be inferred, most blocks wins, deterministically.
    a, b = raw(0, 3, cache_tokens_left=10), raw(0, 3, cache_tokens_left=20)
    entries = {0: {"p": a}, 1: {"p": b}, 2: {"p": b}}
    rec = SwarmSnapshot.from_block_entries("m", 3, entries, now=0.0).servers[PeerIdStr("p")].record
    assert rec.cache_tokens_left == 20


def test_from_records_and_empty_snapshot() -> None:
    snap = SwarmSnapshot.from_records("m", 4, {"a": make_record(0, 2), "b": make_record(0, 9)}, now=1.0)
    assert list(snap.servers) == ["a"]
    empty = SwarmSnapshot("m", 3)
    assert empty.coverage() == [0, 0, 0] and empty.missing_blocks() == [0, 1, 2]
    assert empty.block_throughputs() == [0.0, 0.0, 0.0]
