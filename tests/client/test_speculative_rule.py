"""Speculative decoding without a swarm: the acceptance rule's distribution, and the loop on a local target."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats as scipy_stats

from potluck.client.generation import GenerationParams, generate_tokens
from potluck.client.lookahead import Lookahead, TrackedDraft, draft_branches
from potluck.client.speculative import (
    DraftLengthController,
    LocalDraft,
    SpanRunner,
    SpeculationStats,
    add_weight_noise,
    int8_draft,
    speculative_generate,
    verify_greedy,
    verify_sampled,
)
from potluck.models import LocalCausalLM

SIGNIFICANCE = 1e-3  # a correct rule fails a fixed-seed test with this probability (once, then never)


def _chi2_pvalue(counts: Counter[Any], expected_probs: dict[Any, float], n: int) -> float:
    """Pearson chi-square p-value; outcomes expected fewer than 5 times are pooled into one cell."""
    observed, expected, rare_obs, rare_exp = [], [], 0.0, 0.0
    for outcome, prob in expected_probs.items():
        if prob * n < 5:
            rare_obs += counts.get(outcome, 0)
            rare_exp += prob * n
        else:
            observed.append(counts.get(outcome, 0))
            expected.append(prob * n)
    if rare_exp > 0:
        observed.append(rare_obs)
        expected.append(rare_exp)
    assert sum(observed) == n, "an outcome outside the expected support was produced"
    total = sum(expected)  # float32 probabilities: rescale so the totals agree exactly
    return float(scipy_stats.chisquare(observed, [e * n / total for e in expected]).pvalue)


# --- the acceptance rule alone -----------------------------------------------------------------------------


def test_sampled_rule_reproduces_the_target_distribution() -> None:
    vocab, k, n = 6, 2, 20000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, dim=-1)  # target after each prefix
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, dim=-1)  # a poor draft
    firsts: Counter[int] = Counter()
    draft_firsts: Counter[int] = Counter()
    kept_total = 0
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        kept, nxt = verify_sampled(p, q, drafts, generator=g)
        first = drafts[0] if kept > 0 else nxt
        firsts[first] += 1
        draft_firsts[drafts[0]] += 1
        kept_total += kept
    target = {t: float(p[0, t]) for t in range(vocab)}
    assert _chi2_pvalue(firsts, target, n) > SIGNIFICANCE
    # the same test tells the draft's own distribution apart from the target's (it is not vacuous)
    assert _chi2_pvalue(draft_firsts, target, n) < 1e-12
    # and the rule keeps what it should: E[min(1, p/q)] under q = sum(min(p, q)) for the first proposal
    assert kept_total > 0


def test_sampled_rule_with_the_target_as_draft_keeps_everything() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 5, generator=g), dim=-1)
    for _ in range(200):
        drafts = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(3)]
        kept, _ = verify_sampled(p, p[:3], drafts, generator=g)
        assert kept == 3


def test_greedy_rule_keeps_the_longest_agreeing_prefix() -> None:
    scores = torch.tensor([[0.0, 5, 1], [3, 0, 1], [0, 1, 9], [2, 0, 0]])  # argmax 1, 0, 2, 0
    assert verify_greedy(scores, [1, 0, 2]) == (3, 0)
    assert verify_greedy(scores, [1, 2, 2]) == (1, 0)
    assert verify_greedy(scores, [0, 0, 2]) == (0, 1)
    assert verify_greedy(scores[:1], []) == (0, 1)


def test_draft_length_follows_acceptance_and_cost() -> None:
    best = DraftLengthController.best_k
    assert best(0.0, 0.1, 16) == 1  # a draft that is never right: propose as little as possible
    assert best(0.99, 0.001, 16) == 16  # nearly always right and nearly free: propose the most
    assert best(0.7, 0.05, 16) > best(0.7, 0.3, 16)  # a costlier draft proposes fewer
    assert best(0.9, 0.05, 16) > best(0.5, 0.05, 16)  # a better draft proposes more
    c = DraftLengthController(4, 8)
    for _ in range(20):
        c.update(proposed=c.k, kept=0, draft_seconds=0.01, target_seconds=0.1)
    assert c.k == 1 and c.acceptance < 0.2


def test_draft_length_pays_for_checking_each_position() -> None:
    """On CPU a round of k proposals costs T + k v: the controller fits T and v and proposes fewer."""
    flat, sloped = DraftLengthController(4, 8), DraftLengthController(4, 8)
    for i in range(32):
        proposed = 2 + i % 7
        kept = proposed if i % 3 else proposed // 2  # mostly right: k would grow
        flat.update(proposed, kept, draft_seconds=0.005 * proposed, target_seconds=0.2)
        sloped.update(proposed, kept, draft_seconds=0.005 * proposed, target_seconds=0.2 + 0.05 * proposed)
    base, per_position = sloped.round_cost()
    assert base == pytest.approx(0.2) and per_position == pytest.approx(0.05)
    assert flat.round_cost() == (pytest.approx(0.2), 0.0)
    assert sloped.k < flat.k
    # a round that also carried the prompt does not enter the cost model
    sloped.update(4, 4, draft_seconds=0.02, target_seconds=30.0, timed=False)
    assert sloped.round_cost()[0] == pytest.approx(0.2)


# --- the loop on a local target ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is many times faster than several competing for a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> LocalCausalLM:
    """A 2-block Llama over an 8-token vocabulary, weights scaled so its distributions are neither flat nor peaked."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    path = Path(tmp_path_factory.mktemp("tiny-vocab"))
    hf.save_pretrained(path)
    return LocalCausalLM.from_pretrained(str(path))


def _plain(model: LocalCausalLM, prompt: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    runner = SpanRunner(model.client, model.span, 64)
    return generate_tokens(lambda ids: runner.run(ids, runner.length)[:, -1], prompt, params)


class _RoundTrip:
    """A local target that answers after ``seconds``, like a swarm over a WAN (the draft's time to look ahead)."""

    def __init__(self, runner: SpanRunner, seconds: float) -> None:
        self.runner, self.seconds = runner, seconds

    @property
    def length(self) -> int:
        return self.runner.length

    def run(self, ids: torch.Tensor, position: int, num_logits: int | None = None) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.runner.run(ids, position, num_logits)

    def rollback(self, length: int) -> None:
        self.runner.rollback(length)


def _speculative(
    target: LocalCausalLM, draft: Any, prompt: torch.Tensor, params: GenerationParams, k: int = 3, **kw: Any
) -> tuple[torch.Tensor, SpeculationStats]:
    stats = SpeculationStats()
    runner = SpanRunner(target.client, target.span, 64)
    out = speculative_generate(
        _RoundTrip(runner, kw.pop("round_trip_s")) if "round_trip_s" in kw else runner,
        draft.runner(64),
        prompt,
        params,
        DraftLengthController(k, max(k, 8), adaptive=kw.pop("adaptive", True)),
        vocab_size=target.spec.vocab_size,
        stats=stats,
        **kw,
    )
    return out, stats


def test_local_greedy_equals_plain_greedy(tiny_vocab_model: LocalCausalLM) -> None:
    prompt = torch.tensor([[1, 5, 2, 7]])
    params = GenerationParams(max_new_tokens=30)
    expected = _plain(tiny_vocab_model, prompt, params)
    same, same_stats = _speculative(
        tiny_vocab_model, LocalDraft(tiny_vocab_model), prompt, params, adaptive=False
    )  # k stays 3: every round yields 4 tokens
    noisy = LocalDraft(add_weight_noise(copy.deepcopy(tiny_vocab_model), 1.0, seed=1))
    half, half_stats = _speculative(tiny_vocab_model, noisy, prompt, params)
    assert torch.equal(same, expected) and torch.equal(half, expected)
    assert same_stats.acceptance_rate == 1.0 and same_stats.rounds == 8  # ceil(30 / 4)
    assert 0 < half_stats.accepted < half_stats.drafted


def test_int8_draft_is_close_and_greedy_stays_exact(tiny_vocab_model: LocalCausalLM) -> None:
    """The int8 self-draft (blocks + LM head) proposes; the output is still the fp32 target's, token for token;
    the draft computes logits only where asked (one position per proposal, none for the prompt's others)."""
    prompt = torch.tensor([[1, 5, 2, 7]])
    params = GenerationParams(max_new_tokens=20)
    draft = int8_draft(copy.deepcopy(tiny_vocab_model))
    full = draft.runner(64).run(prompt, 0)  # [1, 4, V]
    last = draft.runner(64).run(prompt, 0, num_logits=1)  # [1, 1, V]
    # (activations are quantised with one scale per call, so the rows of a longer call differ slightly)
    assert last.shape == (1, 1, 8) and torch.allclose(last[0, 0], full[0, -1], atol=0.1)
    exact = SpanRunner(tiny_vocab_model.client, tiny_vocab_model.span, 64).run(prompt, 0)
    assert torch.allclose(full, exact, atol=0.5) and not torch.equal(full, exact)  # int8: close, not equal
    out, stats = _speculative(tiny_vocab_model, draft, prompt, params)
    assert torch.equal(out, _plain(tiny_vocab_model, prompt, params))
    assert stats.accepted > 0 and stats.draft_ms_per_token > 0 and stats.round_ms > 0


def _joint_of_two(model: LocalCausalLM, prompt: torch.Tensor, vocab: int) -> dict[tuple[int, int], float]:
    """Exact probability of each pair of first two sampled tokens (temperature 1, no truncation)."""
    with torch.inference_mode():
        first = torch.softmax(model(input_ids=prompt).logits[0, -1], -1)  # [V]
        both = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)  # [V, T+1]
        second = torch.softmax(model(input_ids=both).logits[:, -1], -1)  # [V, V]
    return {(a, b): float(first[a] * second[a, b]) for a in range(vocab) for b in range(vocab)}


def test_local_sampled_output_has_the_target_distribution(tiny_vocab_model: LocalCausalLM) -> None:
    """The first two sampled tokens (64 outcomes) follow the target's joint distribution, computed exactly."""
    prompt = torch.tensor([[3, 1, 4]])
    params = GenerationParams(max_new_tokens=2, do_sample=True, top_k=None)
    draft_model = add_weight_noise(copy.deepcopy(tiny_vocab_model), 1.0, seed=2)
    target_joint = _joint_of_two(tiny_vocab_model, prompt, 8)
    draft_joint = _joint_of_two(draft_model, prompt, 8)  # what the draft alone would produce
    torch.manual_seed(1234)
    n = 2000
    counts: Counter[tuple[int, int]] = Counter()
    total = SpeculationStats()
    for _ in range(n):
        out, stats = _speculative(
            tiny_vocab_model, LocalDraft(draft_model), prompt, params, k=1, adaptive=False
        )
        counts[(int(out[0, -2]), int(out[0, -1]))] += 1
        total.accepted += stats.accepted
        total.drafted += stats.drafted
    assert 0.2 < total.acceptance_rate < 0.95  # the draft is neither perfect nor useless
    assert _chi2_pvalue(counts, target_joint, n) > SIGNIFICANCE
    assert _chi2_pvalue(counts, draft_joint, n) < 1e-6  # the test tells the draft's distribution apart


def test_drafting_ahead_during_the_round_trip_keeps_greedy_exact(tiny_vocab_model: LocalCausalLM) -> None:
    """The draft proposes the next round while the target checks this one; when the target kept everything and
    added the token the draft guessed, those proposals are used without drafting. The output is unchanged, with
    a perfect draft (every round after the first uses proposals made ahead), a noisy one and none ahead."""
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    params = GenerationParams(max_new_tokens=24)  # 6 rounds of k=3 proposals + 1
    expected = _plain(tiny_vocab_model, prompt, params)
    perfect, perfect_stats = _speculative(
        tiny_vocab_model, LocalDraft(tiny_vocab_model), prompt, params, adaptive=False, round_trip_s=0.2
    )
    noisy_draft = LocalDraft(add_weight_noise(copy.deepcopy(tiny_vocab_model), 1.0, seed=4))
    noisy, noisy_stats = _speculative(tiny_vocab_model, noisy_draft, prompt, params, round_trip_s=0.05)
    plain, plain_stats = _speculative(
        tiny_vocab_model, LocalDraft(tiny_vocab_model), prompt, params, adaptive=False, lookahead=False
    )
    assert torch.equal(perfect, expected) and torch.equal(noisy, expected) and torch.equal(plain, expected)
    # the first round has nothing drafted ahead; the second may not (the acceptance estimate starts at 50%, so
    # branch 1, all 3 proposals kept and the guess right, looks worth only 0.5^4 expected tokens)
    assert perfect_stats.lookahead_rounds >= perfect_stats.rounds - 2 > 0
    assert plain_stats.lookahead_rounds == 0 and plain_stats.rounds == perfect_stats.rounds
    assert noisy_stats.lookahead_rounds < noisy_stats.rounds - 1  # a wrong guess: drafted again


def test_sampling_never_drafts_ahead(tiny_vocab_model: LocalCausalLM) -> None:
    params = GenerationParams(max_new_tokens=12, do_sample=True, top_k=None)
    _, stats = _speculative(
        tiny_vocab_model, LocalDraft(tiny_vocab_model), torch.tensor([[1, 2]]), params,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert stats.rounds > 0 and stats.lookahead_rounds == 0 and stats.lookahead_seconds == 0


def _greedy_chain(model: LocalCausalLM, sequence: torch.Tensor, n: int) -> list[int]:
    """The model's own greedy continuation of ``sequence [1, L]``, recomputed from scratch at every token."""
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            tokens.append(int(model(input_ids=sequence).logits[0, -1].argmax()))
            sequence = torch.cat([sequence, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


def test_tracked_draft_continues_any_sequence_exactly(tiny_vocab_model: LocalCausalLM) -> None:
    """Switching between branches that share a prefix gives the logits of a fresh forward pass every time."""
    tracked = TrackedDraft(LocalDraft(tiny_vocab_model).runner(64), vocab_size=8)
    for ids in (
        [3, 1, 4, 1, 5],
        [3, 1, 4, 1, 5, 2, 6],
        [3, 1, 4, 7],
        [3, 1, 4, 7, 7, 0],
        [2, 2],
        [3, 1, 4, 7, 7],
    ):
        sequence = torch.tensor([ids])
        with torch.inference_mode():
            expected = tiny_vocab_model(input_ids=sequence).logits[0, -1]
        torch.testing.assert_close(tracked.next_logits(sequence), expected, rtol=1e-4, atol=1e-4)
        assert tracked.tokens == ids


def test_lookahead_drafts_the_chain_and_the_second_choices(tiny_vocab_model: LocalCausalLM) -> None:
    """Branch 1 continues the draft's own chain; branch j replaces proposal j by the draft's second choice; each
    branch's proposals are the draft's greedy continuation. Once stopped, the worker drafts nothing more."""
    length, k = 5, 3
    extended = torch.tensor([[3, 1, 4, 1, 5, 2, 6]])  # a sequence of 5 tokens + 2 proposals
    alternatives = [7, 0]
    tracked = TrackedDraft(LocalDraft(tiny_vocab_model).runner(64), vocab_size=8)
    out = Lookahead()
    draft_branches(
        tracked, extended, length, alternatives, k, lambda _, logits: logits, set(), out, min_worth=0.0
    )  # every branch, in full
    guess, *chain = _greedy_chain(tiny_vocab_model, extended, k + 1)
    first = out.match(2, guess)
    assert first is not None and first.proposals == chain and len(first.alternatives) == k
    for j, alternative in enumerate(alternatives):
        branch = out.match(j, alternative)
        forked = torch.cat([extended[:, : length + j], torch.tensor([[alternative]])], dim=1)
        assert branch is not None and branch.proposals == _greedy_chain(tiny_vocab_model, forked, k)
    assert len(out) == 3
    stopped = Lookahead()
    stopped.stop()
    draft_branches(tracked, extended, length, alternatives, k, lambda _, logits: logits, set(), stopped)
    assert len(stopped) == 0  # the target answered before the worker started: nothing more is drafted


def test_lookahead_spends_draft_steps_where_they_are_worth_most(tiny_vocab_model: LocalCausalLM) -> None:
    """A step goes to the branch whose next proposal adds the most expected tokens; none below ``min_worth``.
    A draft kept 90% of the time drafts only branch 1 (a rejection is unlikely); one kept 50% of the time whose
    second choice is right 90% of the time drafts the rejection branches, the likelier one further."""
    length, k = 5, 4
    extended = torch.tensor([[3, 1, 4, 1, 5, 2, 6]])  # 2 proposals
    alternatives = [7, 0]
    tracked = TrackedDraft(LocalDraft(tiny_vocab_model).runner(64), vocab_size=8)

    def drafted(acceptance: float, second_right: float) -> dict[int, int]:
        out = Lookahead()
        draft_branches(
            tracked, extended, length, alternatives, k, lambda _, logits: logits, set(), out,
            acceptance=acceptance, second_right=second_right, min_worth=0.15,
        )  # fmt: skip
        return {kept: len(out.match(kept, token).proposals) for (kept, token) in out._branches}  # type: ignore[union-attr]

    # branch 1: 0.9^3 = 0.73, x0.9 per proposal: 4 proposals (0.48 > 0.15); branch j: 0.9^j x 0.1 x 0.5 < 0.15
    assert drafted(0.9, 0.5) == {2: 4}
    # branch 1: 0.5^3 = 0.125 < 0.15; branch 0: 0.5 x 0.9 = 0.45, 0.225, 0.11; branch 1: 0.225, 0.11
    assert drafted(0.5, 0.9) == {0: 2, 1: 1}


def test_proposals_drafted_ahead_are_priced_by_checking_alone() -> None:
    """Drafting on the critical path costing half a round keeps ``k`` at 1; proposals drafted ahead cost only
    checking, which here costs nothing, so a round takes up to ``AHEAD_EXTRA`` more of them (and no more: a
    longer chain makes the next round's branches less likely)."""
    controller = DraftLengthController(2, 6)
    for _ in range(10):  # 0.25 s per draft token, half the proposals kept
        controller.update(2, 1, draft_seconds=0.5, target_seconds=0.5)
    assert controller.k == 1 and controller.k_ahead == 1 + DraftLengthController.AHEAD_EXTRA == 3
    cheap = DraftLengthController(2, 4)
    # drafting costs nothing: every k is priced alike, and k_ahead stays within the maximum
    for _ in range(10):
        cheap.update(2, 1, draft_seconds=0.0, target_seconds=0.5)
    assert cheap.k == cheap.k_ahead == 4
    constant = DraftLengthController(3, 3, adaptive=False)
    constant.update(3, 1, 0.5, 0.5)
    assert constant.k == constant.k_ahead == 3
