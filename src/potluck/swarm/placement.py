"""Which blocks a server should hold: pure, deterministic placement and rebalancing over a swarm snapshot.

Throughput model (as in Petals). A server contributes its announced ``throughput`` (tokens/s per block) to every
block of its span; a block's throughput is the sum over the servers (online and joining) holding it; the swarm's
throughput is the min over blocks, so 0 while any block is uncovered. Servers keep their span *length* (what fits
in their memory) and choose only where it starts.

Joining (``choose_span``). Take the window of ``length`` blocks where the swarm is weakest: windows are compared
by their *sorted* block throughputs, lexicographically. A window with an uncovered block sorts first (gaps are
filled before anything else); among windows with the same weakest block, the one whose second-weakest block is
weaker wins, and so on; exact ties go to the lowest start.

Rebalancing (``should_move``), run periodically by every server, our version of Petals' rule:

1. ``balance_quality <= 0`` never moves.
2. If some block of my span is held by me alone, stay: leaving would open a gap, even if only until others react.
3. Take my span out and choose the best start for it (with a small bias to my current start, below). Same start:
   stay. ``balance_quality > 1`` then forces the move (for tests and operators), skipping steps 4-5.
4. Shortcut: if even the upper bound of ``optimum.throughput_upper_bound`` could not improve the swarm enough,
   stay without simulating (exact: the settled swarm cannot beat the bound).
5. Simulate the swarm settling: move me, then let every server in turn (shuffled with ``rng``, each round)
   re-choose its start greedily, until a round moves nobody (``max_rounds`` cap). Move iff
   ``initial / settled < balance_quality``, i.e. the swarm would get faster by more than ``1/balance_quality``
   (0.75: by a third; Petals' paper says "at least 20%"). Moving is expensive (reload weights, drop every client's
   attention cache on those blocks), hence the high bar and the settling simulation: a move that the rest of the
   swarm would undo or that only helps until others react is not worth it.

Stay bias. When a server re-chooses, it takes its own contribution out of its current window plus a little more
(``eps`` of it, at least one quantum): its current window looks slightly weaker than it is, so it only leaves for a
window that is strictly better by more than that margin. Without this, two equally good windows make servers
flap between them (Petals uses the same ``(1 + eps)`` trick).

Exact arithmetic. Internally throughputs are integers: multiples of a ``quantum`` (the largest throughput / 2**30,
so rounding is ~1e-9 relative; any positive throughput is at least one quantum). Sums are then exact and
independent of order, so equal windows really tie (float sums of the same servers in another order differ in the
last bit), ties break the same way on every server, and incremental updates (move one server) never drift.

Performance. ``Layout`` is a small mutable representation (per-server lists + an int64 per-block array updated
in O(span) per move) used by ``settle`` and the simulator; one greedy re-choice costs ~15-20 us (numpy sliding
windows: window minima first, full sorted comparison only among windows tied on their minimum).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from potluck.swarm.optimum import throughput_upper_bound
from potluck.swarm.records import PLACEMENT_STATES, ServerState, SwarmSnapshot

DEFAULT_BALANCE_QUALITY = 0.75  # move only if the settled swarm is > 1/0.75 = 1.33x faster (Petals' default)
STAY_BIAS = 1e-3  # relative margin by which a server prefers its current start (anti-flapping)
DEFAULT_MAX_ROUNDS = 32  # settle rounds cap; best-response rounds almost always stop after 2-4
_QUANTA_PER_MAX = 1 << 30  # integer resolution of throughputs, relative to the largest one
_BOUND_SLACK = 1e-9  # float slack when comparing with the (float) upper bound, so the shortcut stays exact

IntArray = npt.NDArray[np.int64]


# --- choosing a window ------------------------------------------------------------------------------------------


def _best_window(totals: npt.NDArray[np.int64] | npt.NDArray[np.float64], length: int) -> int:
    """Start of the lexicographically weakest sorted window of ``length`` blocks; ties -> lowest start."""
    n = totals.shape[0]
    if length >= n:
        return 0
    windows = sliding_window_view(totals, length)
    # Sorting every window is the definition but costs W*L*log L; the weakest block decides almost always, so
    # compare minima first and sort only the windows tied on it.
    minima = windows.min(axis=1)
    tied = np.flatnonzero(minima == minima.min())
    if tied.shape[0] == 1:
        return int(tied[0])
    rows = np.sort(windows[tied], axis=1)
    # lexsort uses the *last* key as primary, so pass columns reversed; it is stable, so equal rows keep their
    # ascending start order and the first one is the lowest start.
    return int(tied[np.lexsort(rows.T[::-1])[0]])


def choose_span(block_throughputs: Sequence[float], num_blocks: int) -> int:
    """Start of the window of ``num_blocks`` blocks where the swarm is weakest (see module docstring).

    ``block_throughputs[b]`` is the swarm's throughput on block ``b`` *without* the choosing server. Windows are
    compared by their sorted throughputs, lexicographically, so a window containing an uncovered block (0) wins;
    exact ties go to the lowest start. ``num_blocks`` is clamped to the model size (then the answer is 0).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    totals = np.asarray(block_throughputs, dtype=np.float64)
    if totals.ndim != 1 or totals.shape[0] == 0:
        raise ValueError("block_throughputs must be a non-empty sequence")
    if not np.all(np.isfinite(totals)):
        raise ValueError("block_throughputs must be finite")
    return _best_window(totals, min(num_blocks, totals.shape[0]))


def swarm_throughput(block_throughputs: Sequence[float]) -> float:
    """Min over blocks (0.0 for an empty model or if any block is uncovered)."""
    return float(min(block_throughputs)) if len(block_throughputs) else 0.0


# --- a light mutable layout -------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where each server sits, with per-block totals kept up to date; the working state of ``settle``.

    Servers are indices (``add`` returns one; ``remove`` deactivates it, indices are never reused). Throughputs
    are stored as integer multiples of ``quantum`` (see module docstring). ``version`` changes on every
    modification, so callers can cache anything derived from the layout (the simulator caches the bound).
    """

    num_blocks: int
    quantum: float
    labels: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    totals: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    version: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not (self.quantum > 0 and math.isfinite(self.quantum)):
            raise ValueError(f"quantum must be finite and > 0, got {self.quantum}")
        if self.totals.shape[0] != self.num_blocks:
            self.totals = np.zeros(self.num_blocks, dtype=np.int64)

    @staticmethod
    def quantum_for(max_throughput: float) -> float:
        """Quantum giving ~1e-9 relative resolution for throughputs up to ``max_throughput``."""
        return max_throughput / _QUANTA_PER_MAX if max_throughput > 0 else 1.0

    @classmethod
    def from_snapshot(
        cls, snapshot: SwarmSnapshot, states: Collection[ServerState] = PLACEMENT_STATES
    ) -> Layout:
        """Servers of ``snapshot`` in ``states`` (online + joining by default), in peer id order, labelled by id."""
        spans = [s for s in snapshot.servers.values() if s.state in states and s.end <= snapshot.num_blocks]
        quantum = cls.quantum_for(max((s.record.throughput for s in spans), default=0.0))
        layout = cls(snapshot.num_blocks, quantum)
        for s in spans:
            layout.add(s.peer_id, s.record.throughput, s.start, s.length)
        return layout

    def to_units(self, throughput: float) -> int:
        if not (throughput >= 0 and math.isfinite(throughput)):
            raise ValueError(f"throughput must be finite and >= 0, got {throughput}")
        # Any positive throughput is worth at least one quantum, so "covered" never rounds to "uncovered".
        return max(1, round(throughput / self.quantum)) if throughput > 0 else 0

    def copy(self) -> Layout:
        return Layout(
            self.num_blocks,
            self.quantum,
            list(self.labels),
            list(self.starts),
            list(self.lengths),
            list(self.units),
            list(self.active),
            self.totals.copy(),
            self.version,
        )

    # --- modifications (all O(span)) ---

    def add(self, label: str, throughput: float, start: int, length: int) -> int:
        """Add a server at ``start`` (length clamped to the model); returns its index."""
        length = max(1, min(length, self.num_blocks))
        if not 0 <= start <= self.num_blocks - length:
            raise ValueError(f"span {start}:{start + length} outside the model's {self.num_blocks} blocks")
        u = self.to_units(throughput)
        self.labels.append(label)
        self.starts.append(start)
        self.lengths.append(length)
        self.units.append(u)
        self.active.append(True)
        self.totals[start : start + length] += u
        self.version += 1
        return len(self.starts) - 1

    def remove(self, index: int) -> None:
        if not self.active[index]:
            return
        s, n = self.starts[index], self.lengths[index]
        self.totals[s : s + n] -= self.units[index]
        self.active[index] = False
        self.version += 1

    def move(self, index: int, start: int) -> None:
        if not self.active[index]:
            raise ValueError(f"server {index} is not in the layout")
        old, n, u = self.starts[index], self.lengths[index], self.units[index]
        if not 0 <= start <= self.num_blocks - n:
            raise ValueError(f"span {start}:{start + n} outside the model's {self.num_blocks} blocks")
        if start == old:
            return
        self.totals[old : old + n] -= u
        self.totals[start : start + n] += u
        self.starts[index] = start
        self.version += 1

    # --- queries ---

    def active_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.active) if a]

    def min_units(self) -> int:
        return int(self.totals.min())

    def throughput(self) -> float:
        """Swarm throughput (min over blocks), in the caller's units."""
        return self.min_units() * self.quantum

    def block_throughputs(self) -> list[float]:
        return [int(x) * self.quantum for x in self.totals]

    def uncovered_blocks(self) -> int:
        """Blocks with zero throughput (uncovered, or held only by zero-throughput servers)."""
        return int(np.count_nonzero(self.totals <= 0))

    def best_start_for_length(self, length: int) -> int:
        """Where a *new* server of ``length`` blocks would go (``choose_span`` over the current totals)."""
        return _best_window(self.totals, max(1, min(length, self.num_blocks)))

    def rechoose(self, index: int, eps: float = STAY_BIAS) -> int:
        """Best start for server ``index`` given everyone else, biased towards its current start."""
        s, n, u = self.starts[index], self.lengths[index], self.units[index]
        penalty = u + max(1, int(u * eps))  # own contribution + stay bias (>= 1 quantum, so ties always stay)
        t = self.totals
        t[s : s + n] -= penalty
        try:
            return _best_window(t, n)
        finally:
            t[s : s + n] += penalty

    def upper_bound_units(self) -> float:
        """``optimum.throughput_upper_bound`` of the active servers, in quanta."""
        idx = self.active_indices()
        return throughput_upper_bound(
            np.array([self.units[i] for i in idx], dtype=np.float64),
            np.array([self.lengths[i] for i in idx], dtype=np.int64),
            self.num_blocks,
        )


# --- settling and rebalancing -----------------------------------------------------------------------------------


def settle(
    layout: Layout, rng: random.Random, *, max_rounds: int = DEFAULT_MAX_ROUNDS, eps: float = STAY_BIAS
) -> int:
    """Let every server greedily re-choose its start, in rounds of ``rng``-shuffled order, until a round moves
    nobody or ``max_rounds`` rounds ran. Mutates ``layout``; returns the number of moves.

    A server whose last re-choice said "stay" is skipped while the layout is unchanged since (its choice depends
    only on the totals and its own position), so the final confirming round is nearly free.
    """
    moves = 0
    stable_at: dict[int, int] = {}  # server -> layout.version at which it last chose to stay
    for _ in range(max_rounds):
        order = layout.active_indices()
        rng.shuffle(order)
        moved = False
        for i in order:
            if stable_at.get(i) == layout.version:
                continue
            new = layout.rechoose(i, eps)
            if new != layout.starts[i]:
                layout.move(i, new)
                moves += 1
                moved = True
            # After a move the server sits at its best response and the bias only strengthens it, so it is
            # stable at the new version too.
            stable_at[i] = layout.version
        if not moved:
            break
    return moves


def _hole_distance(layout: Layout) -> int:
    """Sum over uncovered blocks of the distance to the nearest block held by two or more servers."""
    count = np.zeros(layout.num_blocks, dtype=np.int64)
    for i in layout.active_indices():
        count[layout.starts[i] : layout.starts[i] + layout.lengths[i]] += 1
    holes, spare = np.flatnonzero(count == 0), np.flatnonzero(count >= 2)
    if holes.size == 0 or spare.size == 0:
        return 0
    return int(np.abs(holes[:, None] - spare[None, :]).min(axis=1).sum())


def should_move_in(
    layout: Layout,
    index: int,
    *,
    balance_quality: float = DEFAULT_BALANCE_QUALITY,
    rng: random.Random,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    eps: float = STAY_BIAS,
    upper_bound_units: float | None = None,
) -> int | None:
    """``should_move`` on a ``Layout`` (not modified): the new start for server ``index``, or None to stay.

    ``upper_bound_units`` lets a caller pass a cached ``layout.upper_bound_units()``; computed when needed if None.
    """
    if not layout.active[index]:
        raise ValueError(f"server {index} is not in the layout")
    if balance_quality <= 0:
        return None
    s, n, u = layout.starts[index], layout.lengths[index], layout.units[index]
    totals = layout.totals
    uncovered = int(np.count_nonzero(totals <= 0))
    if uncovered > 0:
        # Repairing a hole: move if fewer blocks stay uncovered, even when that opens a smaller hole behind me. A
        # chain of such moves closes holes that no single server can fill without leaving one (e.g. 4 servers of
        # 2 blocks over 8 blocks must tile exactly). Each move strictly shrinks the hole count, so this ends.
        # No stay bias here: it would make my own window look weaker than a real hole. Counting holes decides.
        without_me = layout.totals.copy()
        without_me[s : s + n] -= u
        best = _best_window(without_me, n)
        if best == s:
            return None
        trial = layout.copy()
        trial.move(index, best)
        if trial.uncovered_blocks() < uncovered:
            return best
        # The same count: worth it if the hole moved closer to spare capacity (blocks held twice), so the next
        # server's check can continue the chain. The summed distance strictly shrinks, so this cannot cycle.
        if trial.uncovered_blocks() == uncovered and _hole_distance(trial) < _hole_distance(layout):
            return best
        return None
    if u > 0 and bool(np.any(totals[s : s + n] <= u)):
        return None  # I alone hold some block of my span: leaving would open a gap
    best = layout.rechoose(index, eps)
    if best == s:
        return None
    if balance_quality > 1:
        return best
    initial = int(totals.min())
    if upper_bound_units is None:
        upper_bound_units = layout.upper_bound_units()
    if initial >= balance_quality * upper_bound_units * (1 + _BOUND_SLACK):
        return None  # settled <= bound, so initial / settled >= balance_quality whatever settling does
    trial = layout.copy()
    trial.move(index, best)
    settle(trial, rng, max_rounds=max_rounds, eps=eps)
    settled = trial.min_units()
    if settled <= 0:
        return None  # would still leave a gap
    return best if initial < balance_quality * settled else None


def should_move(
    snapshot: SwarmSnapshot,
    my_peer_id: str,
    *,
    balance_quality: float = DEFAULT_BALANCE_QUALITY,
    rng: random.Random,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    eps: float = STAY_BIAS,
) -> int | None:
    """Rebalancing decision for a server already in the swarm: its new start, or None to stay.

    Online and joining servers count (``PLACEMENT_STATES``); ``my_peer_id`` must be one of them. The rules are in
    the module docstring; ``rng`` only shuffles the settling order, so a fixed seed gives a fixed answer.
    """
    layout = Layout.from_snapshot(snapshot)
    try:
        index = layout.labels.index(my_peer_id)
    except ValueError:
        raise ValueError(f"{my_peer_id} is not an online or joining server of this snapshot") from None
    return should_move_in(
        layout, index, balance_quality=balance_quality, rng=rng, max_rounds=max_rounds, eps=eps
    )


def choose_span_for(
    snapshot: SwarmSnapshot, my_throughput: float, num_blocks: int, exclude_peer: str | None = None
) -> int:
    """``choose_span`` over a snapshot's online + joining servers, leaving out ``exclude_peer`` (e.g. oneself
    when re-choosing after a restart). ``my_throughput`` does not change the choice in this model (the weakest
    window is weakest whoever fills it); it is validated and kept so that richer cost models fit the same call.
    """
    if not (my_throughput >= 0 and math.isfinite(my_throughput)):
        raise ValueError(f"my_throughput must be finite and >= 0, got {my_throughput}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    others = snapshot.without([exclude_peer]) if exclude_peer is not None else snapshot
    return Layout.from_snapshot(others).best_start_for_length(num_blocks)


# --- sizing -----------------------------------------------------------------------------------------------------


def auto_num_blocks(
    free_memory_bytes: int, block_bytes: int, cache_bytes_per_block: int, *, max_blocks: int | None = None
) -> int:
    """How many blocks fit in ``free_memory_bytes`` (weights + attention cache per block), for ``--num-blocks``.

    Capped at ``max_blocks`` (the model size) if given. Raises ``ValueError`` with the numbers if not even one
    block fits, so the operator sees why instead of a server that announces nothing.
    """
    if block_bytes <= 0 or cache_bytes_per_block < 0:
        raise ValueError(
            f"need block_bytes > 0 and cache_bytes_per_block >= 0, got {block_bytes}, {cache_bytes_per_block}"
        )
    per_block = block_bytes + cache_bytes_per_block
    fits = max(0, free_memory_bytes) // per_block
    if fits < 1:
        raise ValueError(
            f"not even one block fits: {free_memory_bytes / 2**30:.2f} GiB free, one block needs "
            f"{per_block / 2**30:.2f} GiB ({block_bytes / 2**30:.2f} GiB weights + "
            f"{cache_bytes_per_block / 2**30:.2f} GiB attention cache); free memory, quantize, or shrink the cache"
        )
    if max_blocks is not None:
        fits = min(fits, max_blocks)
    return int(fits)
