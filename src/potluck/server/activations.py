"""Autograd graphs kept between a training forward and its backward, so backward need not recompute.

Entries are few and short-lived: a backward normally follows its forward within seconds. An entry that is
missing (evicted, expired, refused for size, or a replacement server) is not an error: backward then recomputes
the forward from the hidden states the request carries anyway.

Bounds: at most ``capacity`` entries and ``max_bytes`` of tensors (output, leaves and every tensor the graph saved
for backward, counted once per storage); the oldest entries go first, an entry bigger than the whole budget is not
kept, and ``expire()`` (called periodically by the server, not only on the next put) frees expired ones.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class KeptForward:
    output: torch.Tensor  # [B, T, H], attached to the graph
    leaves: list[torch.Tensor]  # hidden input, then the tuning tensors, in wire order
    start: int
    end: int
    kept_at: float
    # bytes the entry holds; -1: measured by the cache on put (for row pieces, the first piece carries all)
    nbytes: int = field(default=-1)
    rows: slice | None = None  # a forward kept in row pieces (over shared leaves): the rows of this piece


def graph_bytes(output: torch.Tensor | list[torch.Tensor], leaves: list[torch.Tensor]) -> int:
    """Bytes held by ``output``'s autograd graph (or several outputs' graphs): tensors its nodes saved for
    backward, plus output and leaves.

    Storages are counted once (views and tensors saved by several nodes share them)."""
    seen_storages: set[int] = set()
    total = 0

    def add(t: object) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(t, tuple | list):
            for x in t:
                add(x)

    outputs = output if isinstance(output, list) else [output]
    add(outputs)
    add(leaves)
    seen_nodes: set[int] = set()
    stack = [out.grad_fn for out in outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                with contextlib.suppress(RuntimeError):  # a saved tensor already freed
                    add(getattr(node, name))
        stack.extend(fn for fn, _ in node.next_functions)
    return total


class ActivationCache:
    """At most ``capacity`` graphs and ``max_bytes`` bytes, each for at most ``ttl`` seconds; oldest evicted first."""

    def __init__(self, capacity: int = 32, ttl: float = 120.0, max_bytes: int = 2 << 30):
        self.capacity = capacity
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.nbytes = 0  # bytes held by the kept entries now
        self._entries: OrderedDict[str, list[KeptForward]] = OrderedDict()  # row pieces of one forward each

    def put(self, entry: KeptForward) -> str | None:
        """Keep ``entry`` and return its key, or None if it alone exceeds the byte budget (backward recomputes)."""
        return self.put_parts([entry])

    def put_parts(self, parts: list[KeptForward]) -> str | None:
        """Keep the row pieces of one forward under one key (the budget counts their shared leaves once)."""
        self.expire()
        first = parts[0]
        if first.nbytes < 0:
            first.nbytes = graph_bytes([p.output for p in parts], first.leaves)
        nbytes = sum(max(0, p.nbytes) for p in parts)
        if nbytes > self.max_bytes:
            return None
        while self._entries and (
            len(self._entries) >= self.capacity or self.nbytes + nbytes > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))
        key = uuid.uuid4().hex
        self._entries[key] = parts
        self.nbytes += nbytes
        return key

    def pop(self, key: str | None, start: int, end: int) -> KeptForward | None:
        """The entry for ``key`` if it exists and covers the same blocks (then it is removed)."""
        parts = self.pop_parts(key, start, end)
        return parts[0] if parts else None

    def pop_parts(self, key: str | None, start: int, end: int) -> list[KeptForward] | None:
        """The row pieces kept under ``key`` if they exist and cover the same blocks (then they are removed)."""
        self.expire()
        if key is None or key not in self._entries:
            return None
        parts = self._drop(key)
        if (parts[0].start, parts[0].end) != (start, end):
            return None
        return parts

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def expire(self) -> None:
        """Free every entry older than ``ttl``."""
        now = time.monotonic()
        while self._entries:
            key, parts = next(iter(self._entries.items()))
            if now - parts[0].kept_at <= self.ttl:
                break
            self._drop(key)

    def _drop(self, key: str) -> list[KeptForward]:
        parts = self._entries.pop(key)
        self.nbytes -= sum(max(0, p.nbytes) for p in parts)
        return parts
