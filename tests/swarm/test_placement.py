"""Tests for block placement and rebalancing (pure, no network)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from potluck.swarm.placement import (
    Layout,
    auto_num_blocks,
    choose_span,
    choose_span_for,
    settle,
    should_move,
    should_move_in,
    swarm_throughput,
)
from potluck.swarm.records import ServerState, SwarmSnapshot
from swarm_records import rec, snap


def moved(s: SwarmSnapshot, peer: str, start: int) -> SwarmSnapshot:
    r = s.servers[peer].record  # type: ignore[index]
    new = r.model_copy(update={"start": start, "end": start + r.length})
    return snap(s.num_blocks, **{p: (new if p == peer else x.record) for p, x in s.servers.items()})


def reference_choose(throughputs: list[float], n: int) -> int:
    """The definition, spelled out: lexicographically smallest sorted window, lowest start on ties."""
    n = min(n, len(throughputs))
    return min(range(len(throughputs) - n + 1), key=lambda i: (sorted(throughputs[i : i + n]), i))


def random_layout(rng: random.Random, num_blocks: int, num_servers: int) -> Layout:
    layout = Layout(num_blocks, Layout.quantum_for(1000.0))
    for k in range(num_servers):
        length = rng.randint(1, num_blocks)
        layout.add(
            f"p{k}",
            rng.choice([10.0, 50.0, 100.0, rng.uniform(1, 1000)]),
            rng.randint(0, num_blocks - length),
            length,
        )
    return layout


# --- choose_span --------------------------------------------------------------------------------------------------


def test_gap_is_filled_first() -> None:
    # A window with an uncovered block beats windows that are weaker everywhere else.
    assert choose_span([1, 1, 1, 0, 9, 9], 2) == 2
    assert choose_span([5, 5, 5, 0, 5], 2) == 2  # [5,0] and [0,5] tie -> lowest start
    assert choose_span([0, 5, 5, 5, 5, 0], 3) == 0


def test_weakest_window_is_chosen() -> None:
    assert choose_span([10, 3, 4, 10, 2, 10], 2) == 3  # min 2 at starts 3 and 4, same sorted window -> 3
    assert choose_span([1, 5, 1, 3], 2) == 2  # same weakest block, weaker second block wins
    assert choose_span([10, 10, 10, 1, 2, 10], 3) == 2  # starts 2 and 3 both sort to [1,2,10] -> lowest


def test_ties_go_to_lowest_start_and_length_is_clamped() -> None:
    assert choose_span([7.0] * 10, 3) == 0
    assert choose_span([3, 1, 2], 10) == 0
    assert choose_span([3, 1, 2], 1) == 1
    with pytest.raises(ValueError):
        choose_span([1.0], 0)
    with pytest.raises(ValueError):
        choose_span([], 1)


def test_choose_span_matches_definition() -> None:
    rng = random.Random(1)
    for _ in range(500):
        size = rng.randint(1, 30)
        # Small integers make lots of exact ties, the tricky case for the minima-first shortcut.
        values = [float(rng.randint(0, 4)) for _ in range(size)]
        n = rng.randint(1, size + 2)
        assert choose_span(values, n) == reference_choose(values, n), (values, n)


def test_swarm_throughput() -> None:
    assert swarm_throughput([3.0, 1.0, 2.0]) == 1.0
    assert swarm_throughput([3.0, 0.0]) == 0.0
    assert swarm_throughput([]) == 0.0


def test_choose_span_for_snapshot_counts_joining_and_excludes_self() -> None:
    s = snap(
        8,
        a=rec(0, 4, 100.0),
        b=rec(4, 8, 100.0, state=ServerState.joining),  # joining counts, so blocks 4-7 are not a gap
        c=rec(0, 4, 50.0, state=ServerState.offline),  # offline does not
        me=rec(4, 8, 300.0),
    )
    assert choose_span_for(s, 100.0, 4) == 0  # 100 | 400: take the first half
    assert choose_span_for(s, 100.0, 4, exclude_peer="me") == 0  # 100 | 100: tie -> lowest start
    assert choose_span_for(s.without(["a"]), 100.0, 4) == 0  # 0 | 400: fill the gap
    assert choose_span_for(s.without(["me", "a"]), 100.0, 2) == 0
    assert choose_span_for(snap(8), 100.0, 3) == 0


# --- Layout ---------------------------------------------------------------------------------------------------


def test_layout_totals_stay_exact_under_updates() -> None:
    rng = random.Random(2)
    layout = random_layout(rng, 20, 30)
    for _ in range(300):
        i = rng.randrange(len(layout.starts))
        if not layout.active[i]:
            continue
        if rng.random() < 0.1:
            layout.remove(i)
        else:
            layout.move(i, rng.randint(0, 20 - layout.lengths[i]))
    expected = np.zeros(20, dtype=np.int64)
    for i in layout.active_indices():
        expected[layout.starts[i] : layout.starts[i] + layout.lengths[i]] += layout.units[i]
    assert np.array_equal(layout.totals, expected)


def test_layout_from_snapshot_matches_block_throughputs() -> None:
    s = snap(6, a=rec(0, 3, 10.5), b=rec(2, 6, 7.25), c=rec(1, 2, 3.0, state=ServerState.joining))
    layout = Layout.from_snapshot(s)
    assert layout.labels == ["a", "b", "c"]
    assert layout.block_throughputs() == pytest.approx(s.block_throughputs(), rel=1e-8)
    assert layout.throughput() == pytest.approx(min(s.block_throughputs()), rel=1e-8)


# --- should_move ----------------------------------------------------------------------------------------------


def test_balanced_swarm_never_moves() -> None:
    s = snap(8, a=rec(0, 4), b=rec(0, 4), c=rec(4, 8), d=rec(4, 8))
    for peer in s.servers:
        for seed in range(5):
            assert should_move(s, peer, rng=random.Random(seed)) is None
            assert should_move(s, peer, rng=random.Random(seed), balance_quality=2.0) is None


def test_settled_swarm_never_moves_again() -> None:
    # After settling, every server's greedy choice is where it already is: no move, even when forced, for any
    # rng -- the "no flapping" property.
    rng = random.Random(3)
    for trial in range(20):
        layout = random_layout(rng, rng.randint(4, 30), rng.randint(2, 40))
        settle(layout, random.Random(trial))
        for i in layout.active_indices():
            assert layout.rechoose(i) == layout.starts[i]
            for bq in (0.75, 0.99, 2.0):
                assert should_move_in(layout, i, balance_quality=bq, rng=random.Random(trial)) is None


def test_unbalanced_swarm_moves_and_improves() -> None:
    # 300 tokens/s on blocks 0-3, 100 on 4-7: one server from the crowded half should move.
    s = snap(8, a=rec(0, 4), b=rec(4, 8), c=rec(0, 4), d=rec(0, 4))
    before = min(s.block_throughputs())
    movers = {p: should_move(s, p, rng=random.Random(0)) for p in s.servers}
    assert movers["b"] is None  # sole holder of 4-7
    assert {p for p, m in movers.items() if m is not None} == {"a", "c", "d"}
    after = moved(s, "a", movers["a"])  # type: ignore[arg-type]
    assert movers["a"] == 4
    assert min(after.block_throughputs()) == 2 * before
    # ...and once moved, nobody wants to move any more.
    assert all(should_move(after, p, rng=random.Random(1)) is None for p in after.servers)


def test_sole_holder_never_moves_even_when_forced() -> None:
    s = snap(8, a=rec(0, 4), c=rec(0, 4), d=rec(0, 4), big=rec(4, 8, 1000.0))
    for bq in (0.75, 0.99, 2.0):
        assert should_move(s, "big", rng=random.Random(0), balance_quality=bq) is None


def test_moves_never_open_a_gap() -> None:
    rng = random.Random(4)
    for trial in range(60):
        num_blocks = rng.randint(3, 24)
        layout = random_layout(rng, num_blocks, rng.randint(1, 12))
        covered_before = layout.totals > 0
        if not covered_before.all():
            continue  # with holes, a move may open a smaller one (see the hole-repair tests)
        for i in layout.active_indices():
            for bq in (0.75, 2.0):
                new = should_move_in(layout, i, balance_quality=bq, rng=random.Random(trial))
                if new is None:
                    continue
                trial_layout = layout.copy()
                trial_layout.move(i, new)
                assert np.all(trial_layout.totals[covered_before] > 0), (trial, i, bq)


def test_gap_is_filled_by_a_redundant_server() -> None:
    s = snap(8, a=rec(0, 4), b=rec(0, 4), c=rec(4, 6))  # blocks 6-7 uncovered
    movers = {p: should_move(s, p, rng=random.Random(0)) for p in s.servers}
    assert movers == {"a": 4, "b": 4, "c": None}
    assert min(moved(s, "a", 4).block_throughputs()) == 100.0


def test_balance_quality_zero_never_moves_and_above_one_forces() -> None:
    # Moving the small server v gains 200 -> 190, about 5%: not enough for 0.75 (nor 0.9), forced by 2.0.
    s = snap(8, x=rec(0, 4), y=rec(0, 4), v=rec(0, 4, 20.0), z=rec(4, 8, 90.0), w=rec(4, 8))
    assert should_move(s, "v", rng=random.Random(0)) is None
    assert should_move(s, "v", rng=random.Random(0), balance_quality=0.9) is None
    assert should_move(s, "v", rng=random.Random(0), balance_quality=0.99) == 4
    assert should_move(s, "v", rng=random.Random(0), balance_quality=2.0) == 4
    unbalanced = snap(8, a=rec(0, 4), b=rec(4, 8), c=rec(0, 4), d=rec(0, 4))
    assert all(
        should_move(unbalanced, p, rng=random.Random(0), balance_quality=0.0) is None
        for p in unbalanced.servers
    )


def test_should_move_is_deterministic_and_checks_membership() -> None:
    rng = random.Random(5)
    layout = random_layout(rng, 30, 40)
    a = [
        should_move_in(layout, i, balance_quality=0.95, rng=random.Random(7)) for i in layout.active_indices()
    ]
    b = [
        should_move_in(layout, i, balance_quality=0.95, rng=random.Random(7)) for i in layout.active_indices()
    ]
    assert a == b
    s = snap(4, a=rec(0, 2), off=rec(2, 4, state=ServerState.offline))
    with pytest.raises(ValueError):
        should_move(s, "off", rng=random.Random(0))
    with pytest.raises(ValueError):
        should_move(s, "nobody", rng=random.Random(0))


def test_settle_terminates_and_does_not_lower_a_gapless_swarm_much() -> None:
    rng = random.Random(6)
    for trial in range(20):
        layout = random_layout(rng, 40, 100)
        settle(layout, random.Random(trial), max_rounds=50)
        # A second settle right after is a no-op.
        assert settle(layout, random.Random(trial + 1)) == 0


# --- auto_num_blocks ------------------------------------------------------------------------------------------


def test_auto_num_blocks() -> None:
    gib = 2**30
    assert auto_num_blocks(10 * gib, gib, gib // 4) == 8
    assert auto_num_blocks(10 * gib, gib, 0) == 10
    assert auto_num_blocks(10 * gib, gib, 0, max_blocks=4) == 4
    assert auto_num_blocks(gib, gib, 0) == 1
    with pytest.raises(ValueError, match="not even one block fits"):
        auto_num_blocks(gib, gib, 1)
    with pytest.raises(ValueError, match="not even one block fits"):
        auto_num_blocks(-5, gib, 0)
    with pytest.raises(ValueError):
        auto_num_blocks(gib, 0, 0)


def test_a_chain_of_moves_closes_a_hole_no_single_server_can_fill() -> None:
    """4 servers of 2 blocks over 8 blocks with a hole at 3-4: moves shift the hole to the spare capacity until the
    servers tile exactly; no move ever adds a hole."""
    import random as _random

    from potluck.swarm.placement import Layout, should_move_in

    layout = Layout(8, 1.0)
    for label, start in (("a", 0), ("b", 1), ("c", 5), ("d", 6)):
        layout.add(label, 1.0, start, 2)
    assert layout.uncovered_blocks() == 2  # blocks 3 and 4
    rng = _random.Random(0)
    for _ in range(10):  # every server checks in turn, as the periodic balance checks would
        moved = False
        for i in range(4):
            new = should_move_in(layout, i, rng=rng)
            if new is not None:
                before = layout.uncovered_blocks()
                layout.move(i, new)
                assert layout.uncovered_blocks() <= before  # a hole may move towards spare capacity
                moved = True
        if not moved:
            break
    assert layout.uncovered_blocks() == 0
    assert sorted(layout.starts) == [0, 2, 4, 6]
