"""An upper bound on the best swarm throughput that contiguous spans can reach (numpy only, no LP solver).

Problem. Servers ``i`` with throughput ``t_i`` (tokens/s contributed to each block they hold) and capacity ``c_i``
(blocks they can hold) each place one contiguous window of ``min(c_i, B)`` blocks in a model of ``B`` blocks. Swarm
throughput = min over blocks of the summed throughput of the servers covering it. The best placement is a
bin-packing-like integer problem (hard in general), so we bound it from above instead.

Bound. For any set ``S`` of blocks, every block of ``S`` needs ``>= T``, so ``|S| * T <= sum_i t_i * hits_i(S)``
where ``hits_i(S)`` is the most blocks of ``S`` one window of length ``c_i`` can contain. Hence

    T*  <=  min over S of  sum_i t_i * hits_i(S) / |S|.

We take ``S`` over all arithmetic progressions ``{o, o+d, ..., o+(m-1)d}`` inside the model, for which
``hits_i = min(m, (c_i - 1) // d + 1)`` does not depend on the offset ``o``:

* step ``d = 1`` (runs of ``m`` consecutive blocks) gives exactly the fractional relaxation that ignores
  contiguity: it equals the max-flow bound "binary search on T; source -> server (cap c_i t_i), server -> block
  (cap t_i), block -> sink (cap T)", whose min cut on this complete bipartite graph has the closed form
  ``min over m of sum_i t_i min(c_i, m) / m``. ``m = B`` is "total capacity / B", ``m = 1`` is "everyone on one
  block".
* steps ``d > 1`` add some of what contiguity costs: e.g. the two end blocks ``{0, B-1}`` (``d = B-1``) can only be
  held together by servers with ``c_i = B``, which the fractional relaxation misses.

The same sets give an exact zero test: if the windows cannot touch every block of some ``S`` even once (e.g.
total capacity < B), every placement leaves a gap and the bound is 0.

It remains an upper bound (the integer optimum can be lower, e.g. with few servers of very different speeds), so a
ratio ``achieved / bound`` is a conservative measure of placement quality. Cost: one numpy pass over the ~B ln B
progressions x capacity classes, ~1.5 ms for B = 80 and 1000 servers, independent of the number of servers beyond
one ``bincount``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt


class HasCapacity(Protocol):
    """Anything with a per-block throughput and a capacity in blocks (e.g. ``simulator.SimServer``)."""

    @property
    def throughput(self) -> float: ...

    @property
    def capacity(self) -> int: ...


def throughput_upper_bound(
    throughputs: Sequence[float] | npt.NDArray[np.floating] | npt.NDArray[np.integer],
    capacities: Sequence[int] | npt.NDArray[np.integer],
    num_blocks: int,
) -> float:
    """Upper bound on the best min-over-blocks throughput of contiguous spans (see module docstring).

    Servers with zero throughput or capacity are ignored; capacities above ``num_blocks`` are clamped. Returns 0.0
    for an empty swarm.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    t = np.asarray(throughputs, dtype=np.float64)
    c = np.asarray(capacities, dtype=np.int64)
    if t.shape != c.shape:
        raise ValueError(f"{t.shape[0]} throughputs but {c.shape[0]} capacities")
    if t.size and (not np.all(np.isfinite(t)) or t.min() < 0):
        raise ValueError("throughputs must be finite and >= 0")
    keep = (t > 0) & (c > 0)
    if not keep.any():
        return 0.0
    B = num_blocks
    # Only capacities matter, not identities: aggregate throughput per capacity class (index = capacity 0..B).
    capped = np.minimum(c[keep], B)
    per_cap = np.bincount(capped, weights=t[keep], minlength=B + 1)
    count = np.bincount(capped, minlength=B + 1)
    classes = np.flatnonzero(count > 0)
    caps, per_cap, count = classes.astype(np.int64), per_cap[classes], count[classes]
    best = float(per_cap.sum())  # m = 1: all servers stacked on one block
    steps, lengths = _progressions(B)
    for lo in range(0, len(steps), ROWS_PER_PASS):
        d, m = steps[lo : lo + ROWS_PER_PASS, None], lengths[lo : lo + ROWS_PER_PASS, None]  # [R, 1]
        # [R, K]: the most points of each progression that one window of each capacity class can contain
        hits = (caps[None, :] - 1) // d + 1
        reach = np.minimum(m, hits)
        # Integrality, for free: if the windows cannot even *touch* every point of some S (e.g. total capacity
        # < B), some block stays uncovered in every placement.
        if np.any((reach * count[None, :]).sum(axis=1) < m[:, 0]):
            return 0.0
        totals = (reach * per_cap[None, :]).sum(axis=1) / m[:, 0]
        best = min(best, float(totals.min()))
    return best


ROWS_PER_PASS = 4096  # progressions evaluated per numpy pass: bounds the [rows, capacity classes] temporaries


@functools.lru_cache(maxsize=16)
def _progressions(num_blocks: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Every (step d, length m >= 2) of an arithmetic progression inside ``num_blocks`` blocks, as two flat arrays
    (~B ln B rows): one numpy pass over all of them instead of a Python loop over steps (the simulator calls the
    bound after every join, leave and move)."""
    steps = [d for d in range(1, num_blocks) for _ in range(2, (num_blocks - 1) // d + 2)]
    lengths = [m for d in range(1, num_blocks) for m in range(2, (num_blocks - 1) // d + 2)]
    return np.asarray(steps, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def optimal_throughput(servers: Iterable[HasCapacity | tuple[float, int]], num_blocks: int) -> float:
    """Upper bound on the best swarm throughput ``servers`` can reach with one contiguous window each.

    ``servers`` holds objects with ``.throughput`` and ``.capacity`` or plain ``(throughput, capacity)`` pairs.
    Named "optimal" for the simulator's reports; it is an upper bound (see module docstring), tight for large
    swarms and loose for a handful of very uneven servers.
    """
    ts: list[float] = []
    cs: list[int] = []
    for s in servers:
        if isinstance(s, tuple):
            t, c = s
        else:
            t, c = s.throughput, s.capacity
        ts.append(float(t))
        cs.append(int(c))
    return throughput_upper_bound(ts, cs, num_blocks)
