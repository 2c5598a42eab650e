"""Connection and stream limits shared by the libp2p and direct paths, and the process's file limit.

Every open stream or connection costs a file descriptor, a task and buffers. A peer that opens hundreds of idle
ones must not exhaust what other peers need, so each peer (authenticated libp2p peer id) gets at most
``per_peer`` at a time and the server at most ``total``; over the limit, a new one is refused at once.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter

logger = logging.getLogger(__name__)


class ConnectionLimiter:
    """Counts open connections per peer and in total; ``try_acquire`` refuses past either limit."""

    def __init__(self, per_peer: int, total: int):
        if per_peer < 1 or total < 1:
            raise ValueError("connection limits must be >= 1")
        self.per_peer = per_peer
        self.total = total
        self._open: Counter[str] = Counter()
        self._count = 0
        self.refused = 0  # connections refused so far (for logs and tests)

    def try_acquire(self, peer: str) -> bool:
        if self._count >= self.total or self._open[peer] >= self.per_peer:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                logger.warning(
                    "refused a connection from %s (%d open from it, %d in total; limits %d / %d)",
                    peer[-8:], self._open[peer], self._count, self.per_peer, self.total,
                )  # fmt: skip
            return False
        self._open[peer] += 1
        self._count += 1
        return True

    def release(self, peer: str) -> None:
        if self._open[peer] <= 0:
            return
        self._open[peer] -= 1
        self._count -= 1
        if not self._open[peer]:
            del self._open[peer]

    def open_from(self, peer: str) -> int:
        return self._open[peer]

    def __len__(self) -> int:
        return self._count


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (servers hold a descriptor per connection);
    returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        logger.warning("could not raise the file limit from %d to %d: %s", soft, target, e)
        return soft
    return target
