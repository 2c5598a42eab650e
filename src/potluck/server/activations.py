"""Autograd graphs kept between a training forward and its backward, so backward need not recompute.

Entries are few and short-lived: a backward normally follows its forward within seconds. An entry that is
missing (evicted, expired, or a replacement server) is not an error: backward then recomputes the forward from
the hidden states the request carries anyway.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class KeptForward:
    output: torch.Tensor  # [B, T, H], attached to the graph
    leaves: list[torch.Tensor]  # hidden input, then the tuning tensors, in wire order
    start: int
    end: int
    kept_at: float


class ActivationCache:
    """At most ``capacity`` graphs, each for at most ``ttl`` seconds; oldest evicted first."""

    def __init__(self, capacity: int = 32, ttl: float = 120.0):
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[str, KeptForward] = OrderedDict()

    def put(self, entry: KeptForward) -> str:
        self._expire()
        while len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
        key = uuid.uuid4().hex
        self._entries[key] = entry
        return key

    def pop(self, key: str | None, start: int, end: int) -> KeptForward | None:
        """The entry for ``key`` if it exists and covers the same blocks (then it is removed)."""
        self._expire()
        if key is None:
            return None
        entry = self._entries.pop(key, None)
        if entry is None or (entry.start, entry.end) != (start, end):
            return None
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.kept_at <= self.ttl:
                break
            del self._entries[key]
