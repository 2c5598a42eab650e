"""Drafting ahead for speculative decoding: next round's proposals, made while the swarm checks this round.

Over a WAN the client waits most of a round trip. Greedy speculation knows what the target can answer: it keeps
``j`` of this round's ``n`` proposals and adds one token of its own. The draft spends the wait on the likeliest
answers, one *branch* each, and the loop uses the branch that matches the target's answer as the next round's
proposals without drafting on the critical path:

1. all ``n`` proposals kept, and the target adds the draft's own next token (its greedy chain, continued);
2. proposal ``j`` rejected (``j = 0, 1, ...``) and the target adds the draft's second choice at ``j`` instead.
   When a draft's first choice is wrong, its second is often right: for the bench's int8 draft with noise 0.03,
   in 53% of 200 greedy tokens.

A round trip buys fewer draft steps than the branches want: each step goes to the branch whose next proposal
adds the most expected tokens (:func:`draft_branches`). Branches are drafted only while the round trip lasts: the
loop stops the worker when the target answers (the worker finishes the draft step it is in), and a branch cut
short still gives its first proposals; the loop drafts the rest. The draft's KV cache can hold any branch;
:class:`TrackedDraft` records which tokens it holds, so whoever drafts next continues from the longest prefix it
shares with the sequence (no rollback bookkeeping).
Sampling never drafts ahead: its proposals draw from a generator whose order must not change.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from potluck.client.drafts import CachedLM

ScoresAfter = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (prefix [1, n], logits [V]) -> scores [V]

_threads_lock = threading.Lock()
_one_thread_users = 0  # drafts inside one_thread now (the API runs several generations at once)
_saved_threads = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One-token draft steps are latency- and memory-bound: like the servers' decode steps, they run on one
    thread, so OpenMP workers waiting on cores that other processes hold cannot stall them. The thread count
    is process-wide: the first of overlapping users saves it and the last one restores it."""
    global _one_thread_users, _saved_threads
    with _threads_lock:
        if _one_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                torch.set_num_threads(_saved_threads)


DRAFT_NICENESS = (
    10  # the worker's niceness: drafting ahead takes CPU time the servers and the loop leave idle
)


def lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to everything else of normal priority (Linux: a thread has its
    own niceness). Drafting ahead is a bet on the target's answer; when the client shares cores with other
    work (a laptop, or a benchmark's loopback servers) it must not slow that work down. Where niceness cannot
    be set, nothing changes."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DRAFT_NICENESS)


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft logits on the target's vocabulary: ids past a smaller draft vocabulary get -inf."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class TrackedDraft:
    """A draft's :class:`CachedLM` plus the token ids its cache holds, so it can continue any sequence."""

    SMALL_FEED = 8  # feeds of at most this many tokens run on one thread (see one_thread)

    def __init__(self, lm: CachedLM, vocab_size: int) -> None:
        self.lm, self.vocab_size = lm, vocab_size
        self.tokens: list[int] = []  # ids at positions 0..len-1 of the draft's cache

    def _common(self, ids: list[int]) -> int:
        """Leading tokens of ``ids`` the cache holds, at most all but the last."""
        limit = min(len(self.tokens), len(ids) - 1, self.lm.length)
        common = 0
        while common < limit and self.tokens[common] == ids[common]:
            common += 1
        return common

    def next_logits(self, sequence: torch.Tensor, alone: bool = False) -> torch.Tensor:
        """Logits ``[V_target]`` of the token after ``sequence [1, L]``; feeds only what the cache lacks (at least
        the last token: the cache keeps keys and values, not logits). ``alone``: nothing else of ours wants the
        cores now (the critical path, while the swarm waits for the client), so even a small feed takes every
        thread: the bench's int8 draft steps in 17 ms on 2 threads against 26 ms on one."""
        ids = sequence[0].tolist()
        common = self._common(ids)
        feed = sequence[:, common:]  # [1, L - common]
        small = feed.shape[1] <= self.SMALL_FEED and not alone
        with one_thread() if small else contextlib.nullcontext():
            logits = self.lm.run(feed, common, num_logits=1)[0, -1]  # [V_draft]
        self.tokens = ids
        return fit_vocab(logits, self.vocab_size)


@dataclass
class Branch:
    """One answer the target may give this round, and the draft's proposals for the round after it."""

    kept: int  # proposals of this round the target keeps
    token: int  # the token the target adds after them
    proposals: list[int] = field(default_factory=list)  # the draft's greedy chain after ``token``
    alternatives: list[int] = field(default_factory=list)  # its second choice at each proposal


class Lookahead:
    """Branches drafted on a worker thread during one round trip; :meth:`stop` ends the drafting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._branches: dict[tuple[int, int], Branch] = {}
        self._stop = threading.Event()
        self.seconds = 0.0  # drafting time on the worker

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def publish(self, branch: Branch) -> None:
        with self._lock:
            self._branches[(branch.kept, branch.token)] = Branch(
                branch.kept, branch.token, list(branch.proposals), list(branch.alternatives)
            )

    def match(self, kept: int, token: int) -> Branch | None:
        """The branch for the target's answer, with the proposals drafted so far (None: not drafted)."""
        with self._lock:
            return self._branches.get((kept, token))

    def __len__(self) -> int:
        with self._lock:
            return len(self._branches)


def greedy_choices(scores: torch.Tensor) -> tuple[int, int]:
    """The first and second choice of ``scores [V]`` (the second is -1 for a one-token vocabulary)."""
    top = scores.topk(min(2, scores.shape[-1])).indices.tolist()
    return int(top[0]), int(top[1]) if len(top) > 1 else -1


SWITCH_DISCOUNT = 0.85  # a branch other than the one just drafted must be worth this much more to switch to:
# the draft then re-feeds the tokens since the branches diverged (8 tokens cost ~1.2 one-token steps)


MIN_WORTH = 0.05  # expected tokens below which a draft step ahead is not taken: on shared cores it slows the
# round it overlaps (the bench's 4 loopback servers took ~18% longer per round while a draft ran beside them, as
# much from another process at niceness 10 as from a thread: the cores' caches and memory, not the scheduler).
# Measured against 0.10 and 0.15 with the bench's int8 draft: 2.06x against 1.92x and 1.75x (in one process,
# medians of 4 alternated runs); with noise 0.03 added the three were within the runs' spread (1.61-1.83x).


@dataclass
class _Growing:
    """A branch while the worker drafts it."""

    kept: int
    sequence: torch.Tensor  # [1, n]: the round's prefix, the target's token once known, then the proposals
    chance: float  # estimated probability that the target's answer is this branch
    branch: Branch | None = None  # None until branch 1's guess of the target's token is drafted
    done: bool = False

    def worth(self, acceptance: float) -> float:
        """Expected tokens the next draft step adds: the branch's chance x its next proposal's."""
        return self.chance * acceptance ** (len(self.branch.proposals) if self.branch is not None else 0)


def draft_branches(
    draft: TrackedDraft,
    extended: torch.Tensor,
    length: int,
    alternatives: Sequence[int],
    k: int,
    scores_after: ScoresAfter,
    eos_ids: set[int],
    out: Lookahead,
    *,
    acceptance: float = 0.7,
    second_right: float = 0.5,
    min_worth: float = MIN_WORTH,
) -> None:
    """Draft the branches of a round whose sequence was ``extended[:, :length]`` and whose proposals are
    ``extended[0, length:]`` (``alternatives``: the draft's second choice at each), up to ``k`` proposals each,
    into ``out``. Runs on the worker thread; stops between draft steps once ``out.stop()`` was called.

    A round trip buys a few draft steps, fewer than all branches want, so each step goes where it is worth
    most: to the branch whose next proposal adds the most expected tokens, its chance of being the target's
    answer times the chance its proposals so far are kept. With per-token ``acceptance`` ``a`` and ``n``
    proposals, branch 1 is the answer with chance ``a^(n+1)`` (every proposal kept, then the draft's guess
    right), branch j with ``a^j (1 - a) s`` (``s``: how often the draft's second choice is right when its first
    is not). Steps worth less than ``min_worth`` expected tokens are not taken."""
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            a = min(max(acceptance, 0.05), 0.99)
            proposed = extended.shape[1] - length
            growing = [_Growing(proposed, extended, a ** (proposed + 1))]
            for j, alternative in enumerate(alternatives[:proposed]):
                if alternative < 0 or alternative in eos_ids:
                    continue
                forked = torch.cat([extended[:, : length + j], _token(alternative, extended)], dim=1)
                growing.append(_Growing(j, forked, a**j * (1 - a) * second_right, Branch(j, alternative)))
            current: _Growing | None = None
            while not out.stopped:
                live = [g for g in growing if not g.done]
                if not live:
                    break
                current = max(live, key=lambda g: g.worth(a) * (1.0 if g is current else SWITCH_DISCOUNT))
                if current.worth(a) < min_worth:
                    break
                _draft_step(draft, current, k, scores_after, eos_ids, out)
    finally:
        out.seconds = time.perf_counter() - t0


def _token(token: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[token]], dtype=like.dtype)  # [1, 1]


def _draft_step(
    draft: TrackedDraft, g: _Growing, k: int, scores_after: ScoresAfter, eos_ids: set[int], out: Lookahead
) -> None:
    """One draft token for ``g``: branch 1's guess of the target's token, else its next proposal; published."""
    first, second = greedy_choices(scores_after(g.sequence, draft.next_logits(g.sequence)))
    g.sequence = torch.cat([g.sequence, _token(first, g.sequence)], dim=1)
    if g.branch is None:
        g.branch = Branch(g.kept, first)
        g.done = first in eos_ids or k == 0
    else:
        g.branch.proposals.append(first)
        g.branch.alternatives.append(second)
        g.done = first in eos_ids or len(g.branch.proposals) >= k
    out.publish(g.branch)
