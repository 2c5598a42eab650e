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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from potluck.client.generation import GenerationParams, build_logits_processors, build_stopping_criteria
from potluck.models.client_parts import ClientParts
from potluck.models.kv_cache import KVCache
from potluck.models.local import LocalCausalLM
from potluck.models.span import BlockSpan

if TYPE_CHECKING:
    from potluck.client.model import DistributedModelForCausalLM, InferenceSession

SCHEDULES = ("heuristic", "constant")  # transformers' names: adapt k, or keep num_assistant_tokens


class CachedLM(Protocol):
    """A causal LM with a KV cache that can be rolled back: the draft, and the target as seen by the loop."""

    @property
    def length(self) -> int:
        """Tokens whose keys/values the cache holds."""
        ...

    def run(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Feed ``ids [1, T]`` at ``position`` (<= length; later tokens are forgotten); logits ``[1, T, V]``."""
        ...

    def rollback(self, length: int) -> None:
        """Forget tokens at positions >= ``length``."""
        ...


class DraftModel(Protocol):
    """Anything that gives a fresh :class:`CachedLM` for one generation."""

    def runner(self, max_length: int) -> CachedLM: ...


# --- drafts ------------------------------------------------------------------------------------------------


class SpanRunner:
    """Client parts + a block span (all of a model's blocks, or only its first ones) over our KV cache."""

    def __init__(self, client: ClientParts, span: BlockSpan, max_length: int) -> None:
        self.client, self.span = client, span
        self.cache: KVCache = span.new_cache(1, max_length)

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        self.cache.rollback(position)
        ids = ids.to(self.client.embed_tokens.weight.device)
        hidden = self.span(self.client.pre_blocks(self.client.embed(ids)), cache=self.cache)  # [1, T, H]
        return self.client.head(hidden)  # [1, T, V]

    def rollback(self, length: int) -> None:
        self.cache.rollback(min(length, self.cache.length))


class LocalDraft:
    """A :class:`LocalCausalLM` as draft; ``num_blocks`` keeps only its first blocks (a cheaper, layer-skip draft)."""

    def __init__(self, model: LocalCausalLM, num_blocks: int | None = None) -> None:
        self.model = model
        n = model.span.num_blocks if num_blocks is None else num_blocks
        self.span = model.span if n == model.span.num_blocks else model.span.slice(0, n)

    def runner(self, max_length: int) -> CachedLM:
        return SpanRunner(self.model.client, self.span, max_length)


class HFRunner:
    """A transformers causal LM over a ``DynamicCache`` (``crop`` rolls it back)."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        self.rollback(position)
        out = self.model(input_ids=ids.to(self.model.device), past_key_values=self.cache, use_cache=True)
        return cast(torch.Tensor, out.logits)  # [1, T, V]

    def rollback(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length)


class HFDraft:
    """A transformers ``PreTrainedModel`` (any architecture transformers runs) as draft."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def runner(self, max_length: int) -> CachedLM:
        return HFRunner(self.model)


def load_draft(
    draft: Any, *, num_blocks: int | None = None, dtype: torch.dtype = torch.float32
) -> DraftModel:
    """A draft from a checkpoint path / hub name, a :class:`LocalCausalLM`, a transformers model or a draft.

    Checkpoints of the families our block code supports load as :class:`LocalCausalLM` (safetensors, like the
    client parts); others load with transformers. This is what ``potluck generate --draft`` (and the chat / API
    commands) call once, before passing the result as ``assistant_model=`` to ``generate``.
    """
    if isinstance(draft, LocalDraft | HFDraft):
        return draft
    if isinstance(draft, LocalCausalLM):
        return LocalDraft(draft, num_blocks)
    if isinstance(draft, str):
        from potluck.models.spec import UnsupportedModelError

        try:
            return LocalDraft(LocalCausalLM.from_pretrained(draft, dtype=dtype), num_blocks)
        except UnsupportedModelError:
            from transformers import AutoModelForCausalLM

            return HFDraft(AutoModelForCausalLM.from_pretrained(draft, dtype=dtype))
    if hasattr(draft, "runner"):
        return cast(DraftModel, draft)
    if hasattr(draft, "generation_config") and callable(draft):  # a transformers PreTrainedModel
        return HFDraft(draft)
    raise TypeError(f"cannot use {type(draft).__name__} as a draft model")


@torch.no_grad()
def add_weight_noise(model: torch.nn.Module, relative_std: float, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise of ``relative_std`` times each weight tensor's own std, in place (seeded).

    Makes drafts of a chosen quality from the target itself, for tests and ``bench inference --draft-noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.numel() > 1 and param.is_floating_point():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * float(param.float().std()) * relative_std).to(param.dtype))
    return model


# --- the swarm as a target ---------------------------------------------------------------------------------


class RemoteTarget:
    """An open inference session of a :class:`DistributedModelForCausalLM`, seen as a :class:`CachedLM`."""

    def __init__(self, model: DistributedModelForCausalLM, session: InferenceSession) -> None:
        self.model, self.session = model, session

    @property
    def length(self) -> int:
        return self.session.position

    def run(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        client, prompts = self.model.client, self.model.prompts
        embeds = client.embed(ids)  # [1, T, H]
        remote_position = position + self.session.prefix_length
        if remote_position == self.session.prefix_length and prompts is not None:
            remote_position = 0  # the soft prompt opens the sequence (again, if we rolled back to 0)
            embeds = torch.cat([prompts.prefix(1).to(embeds.dtype), embeds], dim=1)
        hidden = self.session.step(client.pre_blocks(embeds), position=remote_position)  # [1, P?+T, H]
        return client.head(hidden[:, -ids.shape[1] :])  # [1, T, V]

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
    yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average and costs about ``T + k * t`` (``T``: the target's round
    trip, ``t``: one draft token, both measured); ``k`` maximises tokens per second within ``[1, maximum]``.
    """

    def __init__(self, initial: int, maximum: int, adaptive: bool = True, decay: float = 0.9) -> None:
        if initial < 1 or maximum < initial:
            raise ValueError(f"need 1 <= num_assistant_tokens ({initial}) <= max ({maximum})")
        self.k, self.maximum, self.adaptive, self.decay = initial, maximum, adaptive, decay
        self._kept, self._trials = 1.0, 2.0  # a weak prior at 50%
        self._round_s: float | None = None  # EMA of the target's round-trip seconds
        self._draft_token_s: float | None = None  # EMA of seconds per draft token

    @property
    def acceptance(self) -> float:
        return self._kept / self._trials

    def update(self, proposed: int, kept: int, draft_seconds: float, target_seconds: float) -> None:
        if proposed <= 0:
            return
        rejected = 1.0 if kept < proposed else 0.0
        self._kept = self.decay * self._kept + kept
        self._trials = self.decay * self._trials + kept + rejected
        ema = lambda old, new: new if old is None else 0.7 * old + 0.3 * new  # noqa: E731
        self._round_s = ema(self._round_s, target_seconds)
        self._draft_token_s = ema(self._draft_token_s, draft_seconds / proposed)
        if self.adaptive:
            self.k = self.best_k(
                self.acceptance, self._draft_token_s / max(self._round_s, 1e-9), self.maximum
            )

    @staticmethod
    def best_k(acceptance: float, draft_cost: float, maximum: int) -> int:
        """argmax over k of expected tokens per round / (1 + k * draft_cost); draft_cost = t / T."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-6)
        rate = lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + k * draft_cost)  # noqa: E731
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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One-token draft steps are latency- and memory-bound: like the servers' decode steps, they run on one
    thread, so OpenMP workers waiting on cores that other processes hold cannot stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
) -> torch.Tensor:
    """Generate like :func:`potluck.client.generation.generate_tokens`, several tokens per target step.

    ``target`` may already hold a prefix of ``input_ids`` (an inference session continuing); ``draft`` starts
    empty or holds a prefix too. On return the target holds every token but the last, as after plain generation.
    Draft tokens outside the target's ``vocab_size`` are never proposed.
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
    while produced < budget and not done:
        length = sequence.shape[1]
        k = min(controller.k, budget - produced - 1)  # room for the token the target adds itself
        # 1. the draft proposes up to k tokens
        t0 = time.perf_counter()
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []
        extended = sequence
        if k > 0:
            start = min(draft.length, length - 1)
            logits = draft.run(sequence[:, start:], start)[0, -1]  # [V_draft]
            for i in range(k):
                scores = scores_after(extended, _fit_vocab(logits, vocab_size))  # [V]
                if params.do_sample:
                    probs = torch.softmax(scores, dim=-1)  # [V]
                    token = int(torch.multinomial(probs, 1))
                    draft_probs.append(probs)
                else:
                    token = int(scores.argmax())
                drafts.append(token)
                extended = torch.cat([extended, torch.tensor([[token]])], dim=1)
                if token in eos_ids or i == k - 1:
                    break
                with _one_thread():
                    logits = draft.run(extended[:, -1:], extended.shape[1] - 1)[0, -1]
        draft_seconds = time.perf_counter() - t0
        # 2. the target checks the last known token + the proposals in one step
        t0 = time.perf_counter()
        feed = extended[:, target_length:]
        target_logits = target.run(feed, target_length)[0, -(len(drafts) + 1) :]  # [k+1, V]
        target_seconds = time.perf_counter() - t0
        target_scores = torch.stack(
            [scores_after(extended[:, : length + i], target_logits[i]) for i in range(len(drafts) + 1)]
        )  # [k+1, V]
        if params.do_sample:
            p = torch.softmax(target_scores, dim=-1)  # [k+1, V]
            q = torch.stack(draft_probs) if drafts else p[:0]  # [k, V]
            kept, next_token = verify_sampled(p, q, drafts)
        else:
            kept, next_token = verify_greedy(target_scores, drafts)
        # 3. keep the agreed prefix; both caches forget the rest
        target_length = length + kept
        target.rollback(target_length)
        draft.rollback(target_length)
        controller.update(len(drafts), kept, draft_seconds, target_seconds)
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += kept
        stats.first_rejections += int(kept < len(drafts))
        stats.draft_seconds += draft_seconds
        stats.target_seconds += target_seconds
        for token in [*drafts[:kept], next_token]:
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            produced += 1
            stats.new_tokens += 1
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if len(stopping) > 0 and bool(stopping(cast(torch.LongTensor, sequence), None).all()):
                done = True
                break
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
        )
