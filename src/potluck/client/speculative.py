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
replays only accepted positions. The draft's cache is tracked by content (``client/lookahead.py``). ``k``
adapts to the measured acceptance rate and to the draft's cost relative to a round trip
(:class:`DraftLengthController`).

Batch size 1 only (rows would accept different numbers of tokens), as in transformers' assisted generation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from potluck.client.lookahead import (
    Branch,
    Lookahead,
    TrackedDraft,
    draft_branches,
    greedy_choices,
    lower_thread_priority,
)

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

    # proposals drafted ahead beyond ``k`` that a round takes at most. They cost only checking, but a longer
    # chain makes every branch of the next round less likely (branch 1 needs all of it kept): on the bench's
    # int8 draft, k + 2 gave 1.78x where taking up to the cap of 8 gave 1.56x (medians of 4 alternated runs)
    AHEAD_EXTRA = 2

    def __init__(self, initial: int, maximum: int, adaptive: bool = True, decay: float = 0.9) -> None:
        if initial < 1 or maximum < initial:
            raise ValueError(f"need 1 <= num_assistant_tokens ({initial}) <= max ({maximum})")
        self.k, self.maximum, self.adaptive, self.decay = initial, maximum, adaptive, decay
        self._kept, self._trials = 1.0, 2.0  # a weak prior at 50%
        # how often the draft's second choice is right after a miss (greedy); a weak prior at 50%
        self._second_right, self._second_trials = 1.0, 2.0
        self.k_ahead = initial  # proposals a round takes when drafted ahead (they cost only verification)
        self._rounds: deque[tuple[int, float]] = deque(maxlen=32)  # (proposals, target seconds) lately
        self._draft_token_s: float | None = None  # EMA of seconds per draft token

    @property
    def acceptance(self) -> float:
        return self._kept / self._trials

    @property
    def second_right(self) -> float:
        """How often the target took the draft's second choice where it rejected the first (greedy)."""
        return self._second_right / self._second_trials

    def count_second_choice(self, right: bool) -> None:
        self._second_right = self.decay * self._second_right + float(right)
        self._second_trials = self.decay * self._second_trials + 1.0

    def update(
        self,
        proposed: int,
        kept: int,
        draft_seconds: float,
        target_seconds: float,
        timed: bool = True,
        drafted: int | None = None,
    ) -> None:
        """Count a round; ``timed=False`` keeps its seconds out of the cost model (a round that also sent
        the prompt). ``drafted``: proposals drafted in ``draft_seconds`` (default all; proposals drafted ahead
        during the last round trip cost the round nothing, yet ``k`` is priced as if each proposal were drafted
        on the critical path, as it is whenever the target's answer was not one of the branches)."""
        if proposed <= 0:
            return
        rejected = 1.0 if kept < proposed else 0.0
        self._kept = self.decay * self._kept + kept
        self._trials = self.decay * self._trials + kept + rejected
        if timed:
            self._rounds.append((proposed, target_seconds))
            drafted = proposed if drafted is None else drafted
            if drafted > 0:
                token_s = draft_seconds / drafted
                self._draft_token_s = (
                    token_s if self._draft_token_s is None else 0.7 * self._draft_token_s + 0.3 * token_s
                )
        if self.adaptive and self._rounds and self._draft_token_s is not None:
            base, per_position = self.round_cost()
            self.k = self.best_k(
                self.acceptance, self._draft_token_s / base, self.maximum, per_position / base
            )
            free = self.best_k(self.acceptance, 0.0, self.maximum, per_position / base)
            self.k_ahead = max(self.k, min(free, self.k + self.AHEAD_EXTRA))

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

    ``lookahead`` (greedy only): while the swarm checks a round, the draft prepares the next round's proposals
    for the target's likeliest answers on a worker thread (``client/lookahead.py``); when one of them is the
    answer, the next round needs no drafting on the critical path (over a WAN the draft otherwise runs between
    round trips, idle time for the link).

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
    tracked = TrackedDraft(draft, vocab_size)
    if streamer is not None:
        streamer.put(sequence)

    def scores_after(prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores [V] of the token after ``prefix [1, n]`` (repetition penalty, warpers)."""
        row = logits.to(dtype=torch.float32, device="cpu", copy=True)[None]  # [1, V]
        return processors(cast(torch.LongTensor, prefix), row)[0]

    target_length = min(target.length, sequence.shape[1] - 1)  # the last known token is always re-fed
    produced, done = 0, False
    worker = (
        ThreadPoolExecutor(1, thread_name_prefix="potluck-draft", initializer=lower_thread_priority)
        if lookahead and not params.do_sample
        else None
    )
    lookaheads: list[Lookahead] = []
    ready: Branch | None = None  # this round's proposals, drafted during the last round trip
    pending: Future[None] | None = None  # the worker's drafting, until the draft is the loop's again
    try:
        while produced < budget and not done:
            length = sequence.shape[1]
            room = budget - produced - 1  # room for the token the target adds itself
            k = min(controller.k, room)
            # 1. the draft proposes up to k tokens: those made ahead (up to k_ahead: they cost only checking),
            # then, on the critical path, the rest
            drafts = ready.proposals[: min(controller.k_ahead, room)] if ready is not None else []
            drafted_ahead = len(drafts)
            alternatives = ready.alternatives[: len(drafts)] if ready is not None else []
            stats.lookahead_rounds += int(bool(drafts))
            draft_probs: list[torch.Tensor] = []
            extended = torch.cat([sequence, torch.tensor([drafts], dtype=sequence.dtype)], dim=1)
            t0 = time.perf_counter()
            if len(drafts) < k and not (drafts and drafts[-1] in eos_ids):
                if pending is not None:
                    pending.result()  # the worker still drafts another branch: the draft is needed here
                    pending = None
                while len(drafts) < k:
                    # the swarm waits for this round and no worker drafts (done, or none: sampling, lookahead
                    # off): every core drafts
                    scores = scores_after(extended, tracked.next_logits(extended, alone=True))
                    if params.do_sample:
                        probs = torch.softmax(scores, dim=-1)  # [V]
                        token, second = int(torch.multinomial(probs, 1, generator=generator)), -1
                        draft_probs.append(probs)
                    else:
                        token, second = greedy_choices(scores)
                    drafts.append(token)
                    alternatives.append(second)
                    extended = torch.cat([extended, torch.tensor([[token]])], dim=1)
                    if token in eos_ids:
                        break
            draft_seconds = time.perf_counter() - t0
            # 2. the target checks the last known token + the proposals in one step; the draft looks ahead
            t0 = time.perf_counter()
            feed = extended[:, target_length:]
            ahead = None
            if (
                worker is not None
                and not (drafts and drafts[-1] in eos_ids)
                and produced + len(drafts) + 2 < budget
            ):
                ahead = Lookahead()
                pending = worker.submit(
                    draft_branches, tracked, extended, length, alternatives, controller.k_ahead, scores_after,
                    eos_ids, ahead, acceptance=controller.acceptance, second_right=controller.second_right,
                )  # fmt: skip
            try:
                target_logits = target.run(feed, target_length, num_logits=len(drafts) + 1)[0]  # [k+1, V]
            finally:
                if ahead is not None:
                    ahead.stop()
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
                if kept < len(drafts):
                    controller.count_second_choice(next_token == alternatives[kept])
            # 3. keep the agreed prefix; the target's cache forgets the rest (the draft's is tracked)
            target_length = length + kept
            target.rollback(target_length)
            ready = ahead.match(kept, next_token) if ahead is not None else None
            if ready is None and pending is not None:
                pending.result()
                pending = None
            if ahead is not None:
                lookaheads.append(ahead)  # its worker may still be finishing a draft step: timed at the end
            # this round also carried the prompt: not a round's cost
            prefill = feed.shape[1] > len(drafts) + 2
            controller.update(
                len(drafts), kept, draft_seconds, target_seconds, timed=not prefill,
                drafted=len(drafts) - drafted_ahead,
            )  # fmt: skip
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
        stats.lookahead_seconds += sum(ahead.seconds for ahead in lookaheads)
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
