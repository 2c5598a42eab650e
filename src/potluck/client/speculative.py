"""Speculative decoding: a small local draft proposes tokens, the swarm checks them all in one round trip.

Over a WAN a token costs at least one pass through every link of the chain. A draft model on the client (same
tokenizer, much cheaper) proposes up to ``k`` tokens; the swarm runs the last known token plus the ``k`` proposals
as ONE inference step of ``k + 1`` positions, which yields the target's distribution after every prefix. The
client keeps the longest prefix the target agrees with, plus one token chosen by the target itself, so a round
trip yields between 1 and ``k + 1`` tokens:

- greedy: a proposal is kept iff it equals the target's argmax (the output is plain greedy decoding, exactly);
- sampling: the speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023): keep proposal ``d ~ q`` with
  probability ``min(1, p(d) / q(d))``; at the first rejection draw from ``norm(max(0, p - q))``; if all are kept
  draw a bonus token from the target's next distribution. Every output token is then distributed as the target's.

Rejected positions are rolled back on the servers (the next step starts at the accepted length; a position below
a server's cache length rolls that cache back) and dropped from the client's per-hop input history, so a failover
replays only accepted positions. The draft's own cache is rolled back the same way. ``k`` adapts to the measured
acceptance rate and to the draft's cost relative to a round trip (:class:`DraftLengthController`).

Batch size 1 only (rows would accept different numbers of tokens), as in transformers' assisted generation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from potluck.client.drafts import (  # re-exported: drafts were defined here first
    CachedLM,
    DraftModel,
    HFDraft,
    HFRunner,
    Int8Head,
    LocalDraft,
    SpanRunner,
    add_weight_noise,
    int8_draft,
    load_draft,
)
from potluck.client.generation import GenerationParams, build_logits_processors, build_stopping_criteria

__all__ = [
    "CachedLM",
    "DraftModel",
    "HFDraft",
    "HFRunner",
    "Int8Head",
    "LocalDraft",
    "SpanRunner",
    "add_weight_noise",
    "int8_draft",
    "load_draft",
]

if TYPE_CHECKING:
    from potluck.client.model import DistributedModelForCausalLM, InferenceSession

SCHEDULES = ("heuristic", "constant")  # transformers' names: adapt k, or keep num_assistant_tokens


# --- the swarm as a target ---------------------------------------------------------------------------------


class RemoteTarget:
    """An open inference session of a :class:`DistributedModelForCausalLM`, seen as a :class:`CachedLM`."""

    def __init__(self, model: DistributedModelForCausalLM, session: InferenceSession) -> None:
        self.model, self.session = model, session

    @property
    def length(self) -> int:
        return self.session.position

    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        client, prompts = self.model.client, self.model.prompts
        embeds = client.embed(ids)  # [1, T, H]
        remote_position = position + self.session.prefix_length
        if remote_position == self.session.prefix_length and prompts is not None:
            remote_position = 0  # the soft prompt opens the sequence (again, if we rolled back to 0)
            embeds = torch.cat([prompts.prefix(1).to(embeds.dtype), embeds], dim=1)
        hidden = self.session.step(client.pre_blocks(embeds), position=remote_position)  # [1, P?+T, H]
        return client.head(hidden[:, -(num_logits or ids.shape[1]) :])  # [1, n, V]

    def rollback(self, length: int) -> None:
        self.session.rollback(min(length, self.length))


# --- acceptance --------------------------------------------------------------------------------------------


def verify_greedy(target_scores: torch.Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """``target_scores [k+1, V]`` after each prefix; returns (drafts kept, the target's next token)."""
    choices = target_scores.argmax(dim=-1).tolist()  # [k+1]
    kept = 0
    while kept < len(drafts) and choices[kept] == drafts[kept]:
        kept += 1
    return kept, int(choices[kept])


def verify_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Speculative sampling: ``p [k+1, V]`` target and ``q [k, V]`` draft probabilities, drafts ``d_i ~ q_i``.

    Returns (drafts kept, next token). Each kept draft and the next token are distributed exactly as the target's
    sampling would distribute them (draws use ``generator`` or torch's global RNG).
    """
    for i, token in enumerate(drafts):
        target_p, draft_q = float(p[i, token]), float(q[i, token])
        u = float(torch.rand((), generator=generator))
        if draft_q > 0 and u * draft_q < target_p:  # u < p/q, i.e. accept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp_min(0)  # [V]
        if float(residual.sum()) <= 0:  # p == q up to rounding: a rejection had probability ~0
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


class DraftLengthController:
    """Chooses ``k`` (draft tokens per round) from the acceptance rate and the draft's relative cost.

    Per-token acceptance ``a`` is estimated from decayed counts (kept tokens / (kept + first rejections), the
    maximum-likelihood estimate when later proposals of a round are never observed). A round of ``k`` proposals
    yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average and costs about ``T + k * (v + t)`` (``T``: the target's
    round trip, ``v``: what checking one more position adds to it, ``t``: one draft token, all measured);
    ``k`` maximises tokens per second within ``[1, maximum]``. ``v`` matters on CPU, where every position is one
    more row through every block's matmuls on every server and through the client's LM head.
    """

    def __init__(self, initial: int, maximum: int, adaptive: bool = True, decay: float = 0.9) -> None:
        if initial < 1 or maximum < initial:
            raise ValueError(f"need 1 <= num_assistant_tokens ({initial}) <= max ({maximum})")
        self.k, self.maximum, self.adaptive, self.decay = initial, maximum, adaptive, decay
        self._kept, self._trials = 1.0, 2.0  # a weak prior at 50%
        self._rounds: deque[tuple[int, float]] = deque(maxlen=32)  # (proposals, target seconds) lately
        self._draft_token_s: float | None = None  # EMA of seconds per draft token

    @property
    def acceptance(self) -> float:
        return self._kept / self._trials

    def update(
        self, proposed: int, kept: int, draft_seconds: float, target_seconds: float, timed: bool = True
    ) -> None:
        """Count a round; ``timed=False`` keeps its seconds out of the cost model (a round that also sent
        the prompt)."""
        if proposed <= 0:
            return
        rejected = 1.0 if kept < proposed else 0.0
        self._kept = self.decay * self._kept + kept
        self._trials = self.decay * self._trials + kept + rejected
        if timed:
            self._rounds.append((proposed, target_seconds))
            token_s = draft_seconds / proposed
            self._draft_token_s = (
                token_s if self._draft_token_s is None else 0.7 * self._draft_token_s + 0.3 * token_s
            )
        if self.adaptive and self._rounds and self._draft_token_s is not None:
            base, per_position = self.round_cost()
            self.k = self.best_k(
                self.acceptance, self._draft_token_s / base, self.maximum, per_position / base
            )

    def round_cost(self) -> tuple[float, float]:
        """(``T``, ``v``): a least-squares line through recent rounds' (proposals, seconds); ``v >= 0``, and
        ``v = 0`` until rounds of different lengths were seen."""
        ks = [float(k) for k, _ in self._rounds]
        ts = [t for _, t in self._rounds]
        mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
        spread = sum((k - mean_k) ** 2 for k in ks)
        slope = (
            sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts, strict=True)) / spread if spread else 0.0
        )
        slope = max(slope, 0.0)
        return max(mean_t - slope * mean_k, 0.25 * mean_t, 1e-6), slope

    @staticmethod
    def best_k(acceptance: float, draft_cost: float, maximum: int, verify_cost: float = 0.0) -> int:
        """argmax over k of expected tokens per round / (1 + k * (draft_cost + verify_cost)), the costs
        relative to a round trip: draft_cost = t / T, verify_cost = v / T."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-6)
        per_k = draft_cost + verify_cost
        rate = lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + k * per_k)  # noqa: E731
        return max(range(1, maximum + 1), key=lambda k: (rate(k), -k))


@dataclass
class SpeculationStats:
    """What one or more speculative generations did (filled in as they run)."""

    rounds: int = 0  # round trips through the swarm (target steps)
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # proposals the target kept
    new_tokens: int = 0  # tokens generated
    first_rejections: int = 0  # rounds that ended at a rejected proposal
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    prefill_rounds: int = 0  # rounds that also sent the prompt (their seconds are in target_seconds too)
    prefill_seconds: float = 0.0
    lookahead_rounds: int = 0  # rounds whose proposals the draft made during the previous round trip
    lookahead_seconds: float = 0.0  # draft time spent while waiting for the swarm (used or not)

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed tokens that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def token_acceptance(self) -> float:
        """Probability that a proposal is kept given its predecessors were (independent of k)."""
        trials = self.accepted + self.first_rejections
        return self.accepted / trials if trials else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def draft_ms_per_token(self) -> float:
        """What one proposal cost the client."""
        return 1000 * self.draft_seconds / self.drafted if self.drafted else 0.0

    @property
    def round_ms(self) -> float:
        """A target step of the proposals + one, prompts excluded: the round trip plus checking the proposals."""
        rounds = self.rounds - self.prefill_rounds
        return 1000 * (self.target_seconds - self.prefill_seconds) / rounds if rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "token_acceptance": round(self.token_acceptance, 4),
            "tokens_per_round": round(self.tokens_per_round, 4),
            "draft_seconds": round(self.draft_seconds, 4),
            "target_seconds": round(self.target_seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "draft_ms_per_token": round(self.draft_ms_per_token, 2),
            "round_ms": round(self.round_ms, 2),
            "lookahead_rounds": self.lookahead_rounds,
            "lookahead_seconds": round(self.lookahead_seconds, 4),
        }


# --- the loop ----------------------------------------------------------------------------------------------


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft logits on the target's vocabulary: ids past a smaller draft vocabulary get -inf."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


_threads_lock = threading.Lock()
_one_thread_users = 0  # generations inside _one_thread now (the API runs several at once)
_saved_threads = 0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
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


@dataclass
class _Lookahead:
    """Proposals for the next round, made while the swarm checks this one (greedy only, see below)."""

    guess: int  # the draft's guess of the token the target adds after accepting every proposal
    proposals: list[int]  # what the draft proposes after that guess
    seconds: float


def _look_ahead(
    draft: CachedLM,
    extended: torch.Tensor,
    k: int,
    scores_after: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    vocab_size: int,
    eos_ids: set[int],
) -> _Lookahead:
    """Greedy drafting past ``extended [1, L]`` (the sequence with this round's proposals), assuming the target
    keeps them all: the guess of its next token, then ``k`` proposals after it. Runs on a worker thread during
    the round trip; the draft's cache then holds these positions, and rolling back to the accepted length (as
    after every round) drops them when the guess was wrong."""
    t0 = time.perf_counter()
    tokens: list[int] = []
    sequence = extended
    with torch.no_grad(), _one_thread():
        for i in range(k + 1):
            logits = draft.run(sequence[:, -1:], sequence.shape[1] - 1, num_logits=1)[0, -1]  # [V_draft]
            token = int(scores_after(sequence, _fit_vocab(logits, vocab_size)).argmax())
            tokens.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if token in eos_ids or i == k:
                break
    return _Lookahead(tokens[0], tokens[1:], time.perf_counter() - t0)


@torch.no_grad()
def speculative_generate(
    target: CachedLM,
    draft: CachedLM,
    input_ids: torch.Tensor,
    params: GenerationParams,
    controller: DraftLengthController,
    *,
    vocab_size: int,
    streamer: Any = None,
    tokenizer: Any = None,
    stats: SpeculationStats | None = None,
    generator: torch.Generator | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    lookahead: bool = True,
) -> torch.Tensor:
    """Generate like :func:`potluck.client.generation.generate_tokens`, several tokens per target step.

    ``lookahead`` (greedy only): while the swarm checks a round, the draft keeps going on a worker thread as if
    the target kept every proposal and added the draft's own next token; when it did, the next round's proposals
    are ready without drafting time (over a WAN the draft otherwise runs between round trips, idle time for the
    link). Sampling does not look ahead: its proposals draw from ``generator``, whose order must not change.

    ``target`` may already hold a prefix of ``input_ids`` (an inference session continuing); ``draft`` starts
    empty or holds a prefix too. On return the target holds every token but the last, as after plain generation.
    Draft tokens outside the target's ``vocab_size`` are never proposed. Sampling draws from ``generator``
    (default: torch's global RNG). ``on_logits`` gets the target's raw logits ``[V]`` of each new token just
    before the streamer does (the API's logprobs).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding needs one sequence [1, T], got {tuple(input_ids.shape)}")
    stats = stats if stats is not None else SpeculationStats()
    processors = build_logits_processors(params)
    stopping = build_stopping_criteria(params, tokenizer)
    eos_ids = set(params.eos_ids() or [])
    budget = params.num_new_tokens(input_ids.shape[1])
    sequence = input_ids.cpu()  # [1, L]
    if streamer is not None:
        streamer.put(sequence)

    def scores_after(prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores [V] of the token after ``prefix [1, n]`` (repetition penalty, warpers)."""
        row = logits.to(dtype=torch.float32, device="cpu", copy=True)[None]  # [1, V]
        return processors(cast(torch.LongTensor, prefix), row)[0]

    target_length = min(target.length, sequence.shape[1] - 1)  # the last known token is always re-fed
    produced, done = 0, False
    worker = (
        ThreadPoolExecutor(1, thread_name_prefix="potluck-draft")
        if lookahead and not params.do_sample
        else None
    )
    ready: list[int] | None = None  # proposals made ahead for this round
    ready_seconds = 0.0  # what making them cost the draft
    try:
        while produced < budget and not done:
            length = sequence.shape[1]
            k = min(controller.k, budget - produced - 1)  # room for the token the target adds itself
            # 1. the draft proposes up to k tokens (or made them during the last round trip)
            t0 = time.perf_counter()
            drafts: list[int] = []
            draft_probs: list[torch.Tensor] = []
            extended = sequence
            used_ahead, ahead_seconds = ready is not None and k > 0, ready_seconds
            if ready is not None and k > 0:
                drafts = ready[:k]
                extended = torch.cat([sequence, torch.tensor([drafts], dtype=sequence.dtype)], dim=1)
                stats.lookahead_rounds += 1
            elif k > 0:
                start = min(draft.length, length - 1)
                logits = draft.run(sequence[:, start:], start, num_logits=1)[0, -1]  # [V_draft]
                for i in range(k):
                    scores = scores_after(extended, _fit_vocab(logits, vocab_size))  # [V]
                    if params.do_sample:
                        probs = torch.softmax(scores, dim=-1)  # [V]
                        token = int(torch.multinomial(probs, 1, generator=generator))
                        draft_probs.append(probs)
                    else:
                        token = int(scores.argmax())
                    drafts.append(token)
                    extended = torch.cat([extended, torch.tensor([[token]])], dim=1)
                    if token in eos_ids or i == k - 1:
                        break
                    with _one_thread():
                        logits = draft.run(extended[:, -1:], extended.shape[1] - 1, num_logits=1)[0, -1]
            draft_seconds = time.perf_counter() - t0
            # 2. the target checks the last known token + the proposals in one step; the draft looks ahead
            t0 = time.perf_counter()
            feed = extended[:, target_length:]
            ahead = None
            if (
                worker is not None
                and drafts
                and drafts[-1] not in eos_ids
                and produced + len(drafts) + 2 < budget
            ):
                ahead = worker.submit(
                    _look_ahead, draft, extended, controller.k, scores_after, vocab_size, eos_ids
                )
            try:
                target_logits = target.run(feed, target_length, num_logits=len(drafts) + 1)[0]  # [k+1, V]
            finally:  # the draft is ours again before any rollback
                looked = ahead.result() if ahead is not None else None
            target_seconds = time.perf_counter() - t0
            target_scores = torch.stack(
                [scores_after(extended[:, : length + i], target_logits[i]) for i in range(len(drafts) + 1)]
            )  # [k+1, V]
            if params.do_sample:
                p = torch.softmax(target_scores, dim=-1)  # [k+1, V]
                q = torch.stack(draft_probs) if drafts else p[:0]  # [k, V]
                kept, next_token = verify_sampled(p, q, drafts, generator)
            else:
                kept, next_token = verify_greedy(target_scores, drafts)
            # 3. keep the agreed prefix; both caches forget the rest
            target_length = length + kept
            target.rollback(target_length)
            ready = None
            if looked is not None:
                stats.lookahead_seconds += looked.seconds
                if kept == len(drafts) and next_token == looked.guess and looked.proposals:
                    # the draft's cache holds the guess and all of these but the last
                    ready, ready_seconds = looked.proposals, looked.seconds
            if ready is None:
                draft.rollback(target_length)
            # this round also carried the prompt: not a round's cost
            prefill = feed.shape[1] > len(drafts) + 2
            # drafting ahead overlapped the last round trip; the cost model still counts what it cost the draft
            drafted_for = ahead_seconds if used_ahead else draft_seconds
            controller.update(len(drafts), kept, drafted_for, target_seconds, timed=not prefill)
            stats.prefill_rounds += int(prefill)
            stats.prefill_seconds += target_seconds if prefill else 0.0
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.accepted += kept
            stats.first_rejections += int(kept < len(drafts))
            stats.draft_seconds += draft_seconds
            stats.target_seconds += target_seconds
            for i, token in enumerate([*drafts[:kept], next_token]):
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
                produced += 1
                stats.new_tokens += 1
                if on_logits is not None:
                    on_logits(target_logits[i])
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if len(stopping) > 0 and bool(stopping(cast(torch.LongTensor, sequence), None).all()):
                    done = True
                    break
    finally:
        if worker is not None:
            worker.shutdown(wait=True)
    # the target holds the agreed tokens; after an early stop, forget those past the returned sequence
    target.rollback(min(target_length, sequence.shape[1] - 1))
    if streamer is not None:
        streamer.end()
    return sequence.to(input_ids.device)


@dataclass
class Speculation:
    """A draft plus how to use it: what ``generate(assistant_model=...)`` runs for one call."""

    draft: DraftModel
    num_assistant_tokens: int = 4  # k to start with (transformers' name)
    schedule: str = "heuristic"  # "heuristic": adapt k to acceptance and cost; "constant": keep it
    stats: SpeculationStats = field(default_factory=SpeculationStats)  # accumulated over calls
    max_assistant_tokens: int | None = None  # cap on the adaptive k; default max(2 * k, 8)

    def controller(self) -> DraftLengthController:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"num_assistant_tokens_schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        k = self.num_assistant_tokens
        adaptive = self.schedule == "heuristic"
        maximum = self.max_assistant_tokens or (max(2 * k, 8) if adaptive else k)
        return DraftLengthController(k, maximum, adaptive=adaptive)

    def generate(
        self,
        model: DistributedModelForCausalLM,
        session: InferenceSession,
        input_ids: torch.Tensor,
        params: GenerationParams,
        streamer: Any = None,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
        on_logits: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        controller = self.controller()
        total = input_ids.shape[1] + params.num_new_tokens(input_ids.shape[1])
        return speculative_generate(
            RemoteTarget(model, session),
            self.draft.runner(total + controller.maximum + 1),
            input_ids,
            params,
            controller,
            vocab_size=model.client.spec.vocab_size,
            streamer=streamer,
            tokenizer=tokenizer,
            stats=self.stats,
            generator=generator,
            on_logits=on_logits,
        )
