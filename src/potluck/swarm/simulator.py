"""Discrete-event simulation of a swarm placing and rebalancing its blocks with ``placement``'s pure functions.

Model. ``num_blocks`` blocks; servers with a per-block throughput, a capacity (blocks they hold), a join time and
an optional leave time. Events, in time order:

* join: the server takes ``choose_span`` over the current totals (online + joining servers count; loading is
  instantaneous here) and schedules its first rebalance check;
* leave: its blocks lose its throughput at once (a crash or churn; gaps can appear);
* check: every ``balance_period * U(1 - jitter, 1 + jitter)`` each server runs ``should_move_in`` and, if told
  to, moves at once (a real move also costs a reload and the clients' caches; not modelled).

After every join, leave and move we record the swarm throughput (min over blocks), the optimum bound of
``optimum.py`` for the servers present, their ratio (<= 1; conservative since the bound may be unreachable), the
number of uncovered blocks and of servers. Everything is driven by one ``random.Random(seed)``: same scenario and
seed, same result.

``paper`` scenario (modelled on the Petals paper's load-balancing experiment; its exact parameters were not
recovered, so these are ours): servers of uneven speed and memory join one by one, the swarm settles for a few
balance periods, then ``churn_events`` random leaves and joins (half each by default, so the size stays about the
same) arrive over 20 balance periods, then a short cool-down.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from potluck.swarm.optimum import optimal_throughput
from potluck.swarm.placement import (
    DEFAULT_BALANCE_QUALITY,
    DEFAULT_MAX_ROUNDS,
    STAY_BIAS,
    Layout,
    settle,
    should_move_in,
)


@dataclass(frozen=True)
class SimServer:
    """One simulated server: ``throughput`` tokens/s per block, ``capacity`` blocks, present from ``join_time``
    until ``leave_time`` (None: until the end)."""

    name: str
    throughput: float
    capacity: int
    join_time: float
    leave_time: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    num_blocks: int
    servers: tuple[SimServer, ...]
    duration: float  # simulated seconds
    warmup_end: float  # start of the churn phase; "after warm-up" metrics use time >= warmup_end
    balance_period: float = 60.0  # mean seconds between two rebalance checks of one server
    balance_jitter: float = 0.5  # each period is balance_period * U(1 - jitter, 1 + jitter)
    balance_quality: float = DEFAULT_BALANCE_QUALITY
    rebalance: bool = True  # False: servers never move after joining (baseline)
    max_rounds: int = DEFAULT_MAX_ROUNDS
    eps: float = STAY_BIAS
    seed: int = 0


# Server kinds of the paper scenario: (weight, capacity as a fraction of the model, relative speed). A rough mix of
# small consumer GPUs, 24 GB cards and datacenter GPUs: more memory goes with more speed, but not proportionally.
_KINDS: tuple[tuple[float, float, float], ...] = (
    (0.35, 0.08, 1.0),
    (0.35, 0.20, 2.0),
    (0.20, 0.35, 4.0),
    (0.10, 0.70, 5.0),
)
_BASE_TOKENS_PER_S = 100.0


def _draw_server(rng: random.Random, name: str, num_blocks: int, join_time: float) -> SimServer:
    _, frac, speed = rng.choices(_KINDS, weights=[k[0] for k in _KINDS])[0]
    capacity = max(1, min(num_blocks, round(frac * num_blocks * rng.uniform(0.8, 1.2))))
    # Log-normal spread within a kind: same GPU, different hosts, networks and load.
    throughput = _BASE_TOKENS_PER_S * speed * math.exp(rng.gauss(0.0, 0.3))
    return SimServer(name, round(throughput, 3), capacity, join_time)


def paper_scenario(
    num_servers: int = 100,
    num_blocks: int = 80,
    *,
    seed: int = 0,
    churn_events: int | None = None,
    balance_quality: float = DEFAULT_BALANCE_QUALITY,
    balance_period: float = 60.0,
    rebalance: bool = True,
    churn_join_fraction: float = 0.5,
) -> Scenario:
    """Uneven servers join one by one, then churn: see the module docstring. ``churn_events`` defaults to
    ``num_servers``; a ``churn_join_fraction`` of them are joins of new servers, the rest leaves (0: the swarm
    only shrinks, so only rebalancing can repair it)."""
    if not 0.0 <= churn_join_fraction <= 1.0:
        raise ValueError("churn_join_fraction must be in [0, 1]")
    if num_servers < 1 or num_blocks < 1:
        raise ValueError("need at least one server and one block")
    churn = num_servers if churn_events is None else churn_events
    if churn < 0:
        raise ValueError("churn_events must be >= 0")
    rng = random.Random(f"paper-{seed}")
    # Joins spread over 10 balance periods whatever the size, so each server sees a few checks during warm-up.
    join_gap = 10 * balance_period / num_servers
    servers: list[SimServer] = [
        _draw_server(rng, f"s{i}", num_blocks, i * join_gap) for i in range(num_servers)
    ]
    warmup_end = num_servers * join_gap + 3 * balance_period
    churn_span = 20 * balance_period
    leave_at: dict[int, float] = {}
    present = list(range(num_servers))
    for k in range(churn):
        t = warmup_end + churn_span * (k + rng.random()) / max(churn, 1)
        # Never let the swarm drop below 2 servers.
        if rng.random() >= churn_join_fraction and len(present) > 2:
            victim = present.pop(rng.randrange(len(present)))
            leave_at[victim] = t
        else:
            present.append(len(servers))
            servers.append(_draw_server(rng, f"s{len(servers)}", num_blocks, t))
    servers = [
        SimServer(s.name, s.throughput, s.capacity, s.join_time, leave_at.get(i))
        for i, s in enumerate(servers)
    ]
    return Scenario(
        name="paper",
        num_blocks=num_blocks,
        servers=tuple(servers),
        duration=warmup_end + churn_span + 2 * balance_period,
        warmup_end=warmup_end,
        balance_period=balance_period,
        balance_quality=balance_quality,
        rebalance=rebalance,
        seed=seed,
    )


SCENARIOS = {"paper": paper_scenario}

_JOIN, _LEAVE, _CHECK = 0, 1, 2  # at equal times: joins, then leaves, then checks


def run_simulation(scenario: Scenario) -> dict[str, Any]:
    """Run ``scenario``; returns a JSON-able dict (``timeline`` + summary, see ``simulate_main``)."""
    t0 = time.perf_counter()
    rng = random.Random(scenario.seed)
    B = scenario.num_blocks
    servers = scenario.servers
    layout = Layout(B, Layout.quantum_for(max((s.throughput for s in servers), default=0.0)))
    index_of: dict[int, int] = {}  # scenario server -> layout index
    events: list[tuple[float, int, int, int]] = []  # (time, kind, seq, server)
    for i, s in enumerate(servers):
        events.append((s.join_time, _JOIN, i, i))
        if s.leave_time is not None:
            events.append((s.leave_time, _LEAVE, i, i))
    heapq.heapify(events)
    seq = len(servers)

    bound_cache: tuple[int, float, float] = (-1, 0.0, 0.0)  # (layout version, bound in quanta, bound real)

    def bounds() -> tuple[float, float]:
        nonlocal bound_cache
        if bound_cache[0] != layout.version:
            present = [servers[i] for i, li in index_of.items() if layout.active[li]]
            real = optimal_throughput(present, B)
            bound_cache = (layout.version, layout.upper_bound_units(), real)
        return bound_cache[1], bound_cache[2]

    timeline: list[dict[str, float | int]] = []
    moves = checks = 0

    def record(now: float) -> None:
        thr = layout.throughput()
        opt = bounds()[1]
        timeline.append(
            {
                "time": round(now, 3),
                "swarm_throughput": round(thr, 3),
                "optimum": round(opt, 3),
                "ratio": round(thr / opt, 4) if opt > 0 else 0.0,
                "uncovered_blocks": layout.uncovered_blocks(),
                "online_servers": sum(1 for li in index_of.values() if layout.active[li]),
            }
        )

    def next_check(now: float) -> float:
        j = scenario.balance_jitter
        return now + scenario.balance_period * rng.uniform(1 - j, 1 + j)

    while events:
        now, kind, _, i = heapq.heappop(events)
        if now > scenario.duration:
            break
        s = servers[i]
        if kind == _JOIN:
            start = layout.best_start_for_length(s.capacity)
            index_of[i] = layout.add(s.name, s.throughput, start, s.capacity)
            if scenario.rebalance:
                seq += 1
                heapq.heappush(events, (next_check(now), _CHECK, seq, i))
            record(now)
        elif kind == _LEAVE:
            if i in index_of:
                layout.remove(index_of[i])
                record(now)
        else:
            li = index_of.get(i)
            if li is None or not layout.active[li]:
                continue  # left since; its checks stop
            checks += 1
            new = should_move_in(
                layout,
                li,
                balance_quality=scenario.balance_quality,
                rng=rng,
                max_rounds=scenario.max_rounds,
                eps=scenario.eps,
                upper_bound_units=bounds()[0],
            )
            if new is not None:
                layout.move(li, new)
                moves += 1
                record(now)
            seq += 1
            heapq.heappush(events, (next_check(now), _CHECK, seq, i))
    if not timeline or timeline[-1]["time"] < scenario.duration:
        record(scenario.duration)  # close the last interval so time-weighted means cover the whole run

    # What the final swarm could reach if every server re-chose greedily at once (balance_quality ignored): shows
    # how much of the gap to the bound is the move threshold's doing and how much the greedy's or the bound's.
    potential = layout.copy()
    settle(potential, random.Random(scenario.seed), max_rounds=scenario.max_rounds, eps=scenario.eps)
    final_opt = bounds()[1]
    settled_ratio = round(potential.throughput() / final_opt, 4) if final_opt > 0 else 0.0

    after = [p for p in timeline if p["time"] >= scenario.warmup_end]
    at_warmup_end = [p for p in timeline if p["time"] <= scenario.warmup_end]
    return {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "num_blocks": B,
        "num_servers_total": len(servers),
        "balance_quality": scenario.balance_quality,
        "rebalance": scenario.rebalance,
        "warmup_end": scenario.warmup_end,
        "duration": scenario.duration,
        "timeline": timeline,
        "warmup_ratio": at_warmup_end[-1]["ratio"] if at_warmup_end else 0.0,
        "final_ratio": timeline[-1]["ratio"],
        "min_ratio_after_warmup": min((p["ratio"] for p in after), default=0.0),
        "mean_ratio": _time_weighted_mean(after, "ratio", scenario.duration),
        "settled_ratio_final": settled_ratio,
        "uncovered_blocks_final": timeline[-1]["uncovered_blocks"],
        "max_uncovered_after_warmup": max((p["uncovered_blocks"] for p in after), default=0),
        "time_with_gaps_after_warmup": _time_where(after, scenario.duration),
        "moves": moves,
        "checks": checks,
        "runtime_s": round(time.perf_counter() - t0, 3),
    }


def _time_weighted_mean(points: Sequence[dict[str, float | int]], key: str, end: float) -> float:
    """Mean of a step function (value holds until the next point) over [first point, end]."""
    if not points:
        return 0.0
    total = weight = 0.0
    for p, q in zip(points, [*points[1:], None], strict=True):
        dt = (q["time"] if q is not None else end) - p["time"]
        total += p[key] * dt
        weight += dt
    return round(total / weight, 4) if weight > 0 else float(points[-1][key])


def _time_where(points: Sequence[dict[str, float | int]], end: float) -> float:
    """Simulated seconds during which some block was uncovered."""
    return round(
        sum(
            ((q["time"] if q is not None else end) - p["time"])
            for p, q in zip(points, [*points[1:], None], strict=True)
            if p["uncovered_blocks"] > 0
        ),
        3,
    )


def downsample(timeline: Sequence[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """At most ``max_points`` evenly spaced entries (first and last kept) plus every entry with a gap."""
    if len(timeline) <= max_points or max_points < 2:
        return list(timeline)
    step = (len(timeline) - 1) / (max_points - 1)
    keep = {round(k * step) for k in range(max_points)}
    return [p for k, p in enumerate(timeline) if k in keep]


def simulate_main(argv: list[str] | None = None) -> int:
    """``potluck simulate``: run a scenario and print a summary (or one JSON object with ``--json``)."""
    p = argparse.ArgumentParser(prog="potluck simulate", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="paper")
    p.add_argument("--servers", type=int, default=100, help="servers joining in the warm-up phase")
    p.add_argument("--blocks", type=int, default=80, help="transformer blocks in the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--churn-events", type=int, default=None, help="leaves + joins after warm-up (default: --servers)"
    )
    p.add_argument("--balance-quality", type=float, default=DEFAULT_BALANCE_QUALITY)
    p.add_argument("--balance-period", type=float, default=60.0, help="mean seconds between rebalance checks")
    p.add_argument(
        "--churn-join-fraction",
        type=float,
        default=0.5,
        help="share of churn events that are joins (rest: leaves)",
    )
    p.add_argument("--no-rebalance", action="store_true", help="servers never move after joining (baseline)")
    p.add_argument("--timeline-points", type=int, default=200, help="timeline entries kept in --json output")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.servers < 1 or args.blocks < 1:
        p.error("--servers and --blocks must be >= 1")
    scenario = SCENARIOS[args.scenario](
        args.servers,
        args.blocks,
        seed=args.seed,
        churn_events=args.churn_events,
        balance_quality=args.balance_quality,
        balance_period=args.balance_period,
        rebalance=not args.no_rebalance,
        churn_join_fraction=args.churn_join_fraction,
    )
    result = run_simulation(scenario)
    if args.json:
        out = dict(result, timeline=downsample(result["timeline"], args.timeline_points))
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(
        f"scenario {result['scenario']}: {args.servers} servers, {args.blocks} blocks, seed {args.seed}, "
        f"{result['num_servers_total']} servers over the run"
    )
    print(
        f"ratio to optimum bound: warm-up end {result['warmup_ratio']:.3f}, "
        f"mean after warm-up {result['mean_ratio']:.3f}, min after warm-up {result['min_ratio_after_warmup']:.3f}, "
        f"final {result['final_ratio']:.3f} (fully settled: {result['settled_ratio_final']:.3f})"
    )
    print(
        f"uncovered blocks: final {result['uncovered_blocks_final']}, max after warm-up "
        f"{result['max_uncovered_after_warmup']} ({result['time_with_gaps_after_warmup']:.0f} s with gaps)"
    )
    print(f"moves {result['moves']} in {result['checks']} checks; runtime {result['runtime_s']:.2f} s")
    return 0
