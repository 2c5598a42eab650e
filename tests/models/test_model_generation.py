"""generate_tokens over LocalCausalLM vs transformers' generate: greedy, seeded sampling, eos/pad, streamer."""

from __future__ import annotations

import pytest
import torch

from potluck.client.generation import GenerationParams, generate_tokens
from tiny_models import MAIN_KINDS

PROMPT_LEN = 8
NEW_TOKENS = 32


def _prompt(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def _hf_generate(hf, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_greedy_matches_transformers(kind, hf_model, local_model):
    hf, model = hf_model(kind), local_model(kind)
    ids = _prompt()
    # no eos, so all 32 tokens are compared
    expected = _hf_generate(hf, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    got = model.generate(ids, hf.generation_config, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert got.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_seeded_sampling_matches_transformers(kind, hf_model, local_model):
    hf, model = hf_model(kind), local_model(kind)
    ids = _prompt(seed=1)
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.3,
    )
    torch.manual_seed(1234)
    expected = _hf_generate(hf, ids, **kwargs)
    torch.manual_seed(1234)
    got = model.generate(ids, hf.generation_config, **kwargs)
    assert torch.equal(got, expected)
    # and the default warpers (top_k=50 like HF) when only do_sample is given
    torch.manual_seed(5)
    expected = _hf_generate(hf, ids, max_new_tokens=16, do_sample=True)
    torch.manual_seed(5)
    got = model.generate(ids, hf.generation_config, max_new_tokens=16, do_sample=True)
    assert torch.equal(got, expected)


def test_eos_pads_finished_rows_like_transformers(hf_model, local_model):
    hf, model = hf_model("llama-gqa-llama3rope"), local_model("llama-gqa-llama3rope")
    ids = _prompt(seed=0)
    free = model.generate(ids, max_new_tokens=NEW_TOKENS)
    row0, row1 = free[0, PROMPT_LEN:].tolist(), free[1, PROMPT_LEN:].tolist()
    # an eos that row 0 generates first at step k >= 2 and row 1 never generates: row 0 finishes early
    k = next(i for i in range(2, NEW_TOKENS) if row0[i] not in row0[:i] and row0[i] not in row1)
    eos = row0[k]
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    expected = _hf_generate(hf, ids, **kwargs)
    got = model.generate(ids, hf.generation_config, **kwargs)
    assert torch.equal(got, expected)
    assert int(got[0, PROMPT_LEN + k]) == eos and (got[0, PROMPT_LEN + k + 1 :] == 0).all()
    # once every row finished, the loop stops early
    both = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, eos_token_id=[eos, 999])
    assert both.shape[1] == PROMPT_LEN + k + 1 and int(both[0, -1]) == eos


def test_streamer_protocol_and_step_calls(local_model):
    model = local_model("bloom")
    ids = _prompt(batch=1)
    calls: list[tuple[int, ...]] = []
    put: list[torch.Tensor] = []
    ended: list[bool] = []

    class Streamer:
        def put(self, value: torch.Tensor) -> None:
            put.append(value)

        def end(self) -> None:
            ended.append(True)

    cache = model.new_cache(1, PROMPT_LEN + 5)

    def step(new_ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(new_ids.shape))
        return model.step(new_ids, cache)[:, -1]

    out = generate_tokens(step, ids, GenerationParams(max_new_tokens=5), streamer=Streamer())
    assert calls == [(1, PROMPT_LEN)] + [(1, 1)] * 4
    assert torch.equal(put[0], ids) and len(put) == 6 and ended == [True]
    assert torch.equal(torch.cat([p.view(1, -1) for p in put], dim=1), out)


def test_params_resolution_like_hf():
    from transformers import GenerationConfig

    defaults = GenerationParams.from_kwargs(None)
    assert (defaults.do_sample, defaults.top_k, defaults.top_p, defaults.temperature) == (False, 50, 1.0, 1.0)
    assert defaults.num_new_tokens(prompt_length=5) == 15  # HF's max_length=20 default
    config = GenerationConfig(eos_token_id=[2, 3], temperature=0.5, max_new_tokens=7)
    params = GenerationParams.from_kwargs(config, top_p=0.8)
    assert params.eos_token_id == (2, 3) and params.temperature == 0.5 and params.top_p == 0.8
    assert params.num_new_tokens(100) == 7
    assert GenerationParams.from_kwargs(config, eos_token_id=None).eos_token_id is None
    with pytest.raises(TypeError):
        GenerationParams.from_kwargs(None, num_beam_groups=2)  # diverse beam search: not implemented
    with pytest.raises(ValueError):
        generate_tokens(
            lambda x: torch.zeros(1, 4),
            torch.zeros(1, 2, dtype=torch.long),
            GenerationParams(max_new_tokens=1, stop_strings=("x",)),
        )


def _char_tokenizer():
    # token i is one character ("a".."z", then other code points); no hub access needed
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i) if i < 26 else chr(0x100 + i): i for i in range(256)}
    backend = Tokenizer(WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="a")


def test_stop_strings_match_transformers(hf_model, local_model):
    hf, model = hf_model("mistral"), local_model("mistral")
    tokenizer = _char_tokenizer()
    ids = _prompt(seed=0)
    free = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    row0, row1 = free[0, PROMPT_LEN:].tolist(), free[1, PROMPT_LEN:].tolist()
    k = next(i for i in range(2, NEW_TOKENS) if row0[i] not in row0[:i] and row0[i] not in row1)
    stop = tokenizer.decode([row0[k]])
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_id=None, stop_strings=[stop])
    expected = _hf_generate(hf, ids, tokenizer=tokenizer, **kwargs)
    got = model.generate(ids, hf.generation_config, tokenizer=tokenizer, **kwargs)
    assert torch.equal(got, expected)
    # a single row stops right after the stop string
    one = model.generate(ids[:1], tokenizer=tokenizer, **kwargs)
    assert one.shape[1] == PROMPT_LEN + k + 1 and tokenizer.decode(one[0, -1:]) == stop
