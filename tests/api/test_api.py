"""`potluck api` over a loopback swarm, driven by the official `openai` client: exact against transformers.

One module-wide swarm: a bootstrap, two servers of a tiny Llama (with Prometheus metrics), `potluck api` in front
of them, a second `potluck api` whose model has blocks nobody serves, and a third with a speculative draft.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import torch
from tiny_tokenizer import checkpoint_with_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.cli.local_swarm import LocalSwarm
from potluck.client.speculative import add_weight_noise

pytestmark = pytest.mark.swarm

KIND = "llama-gqa-llama3rope"
KEY = "test-key-123"
SPLIT = 3  # server a: blocks 0:3, server b: 3:8
PARTIAL_PREFIX = "tiny-partial"  # a model whose blocks 3:8 nobody serves


@pytest.fixture(scope="module")
def env(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    ckpt = checkpoint_with_tokenizer(tiny_model_dir(KIND), tmp_path_factory.mktemp("ckpt-tok"))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    draft = tmp_path_factory.mktemp("draft")  # the model with noise: right about half the time
    add_weight_noise(AutoModelForCausalLM.from_pretrained(ckpt), 0.1, seed=1).save_pretrained(draft)  # type: ignore[operator]
    with LocalSwarm(tmp_path_factory.mktemp("api-logs")) as swarm:
        peers = swarm.start_bootstrap()
        metrics = ["--metrics-port", "0"]
        servers = [
            swarm.start_server(ckpt, (0, SPLIT), name="a", extra_args=metrics, wait=False),
            swarm.start_server(ckpt, (SPLIT, 8), name="b", extra_args=metrics, wait=False),
            swarm.start_server(ckpt, (0, SPLIT), name="partial", wait=False,
                               extra_args=["--model-prefix", PARTIAL_PREFIX]),
        ]  # fmt: skip
        swarm.wait_ready(servers)
        api = ["api", ckpt, "--initial-peers", *peers, "--port", "0"]
        full = swarm.start_process("api", [*api, "--api-key", KEY], wait=False)
        partial = swarm.start_process(
            "api-partial", [*api, "--model-prefix", PARTIAL_PREFIX, "--wait-for-servers", "1"], wait=False
        )
        drafted = swarm.start_process(
            "api-draft", [*api, "--api-key", KEY, "--draft", str(draft)], wait=False
        )
        swarm.wait_ready([full, partial, drafted])
        yield {
            "swarm": swarm,
            "ckpt": ckpt,
            "peers": peers,
            "url": str(full.info["url"]),
            "partial_url": str(partial.info["url"]),
            "draft_url": str(drafted.info["url"]),
            "server_metrics": [f"http://127.0.0.1:{s.info['metrics_port']}/metrics" for s in servers[:2]],
            "hf": hf,
            "tok": AutoTokenizer.from_pretrained(ckpt),
        }


def _client(env: dict[str, Any], key: str = KEY, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=(url or env["url"]) + "/v1", api_key=key, max_retries=0, timeout=120)


def _expected(env: dict[str, Any], ids: list[int], max_new: int, **sampling: Any) -> tuple[str, int, bool]:
    """transformers' continuation: (text, number of new tokens, whether it ended with eos)."""
    if sampling.get("do_sample"):
        torch.manual_seed(sampling.pop("seed"))
    out = env["hf"].generate(torch.tensor([ids]), max_new_tokens=max_new, **sampling)[0, len(ids) :].tolist()
    text = env["tok"].decode(out, skip_special_tokens=True)
    return text, len(out), bool(out) and out[-1] == env["tok"].eos_token_id


def _chat_ids(env: dict[str, Any], messages: list[dict[str, str]]) -> list[int]:
    text = env["tok"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(env["tok"](text, add_special_tokens=False).input_ids)


def _metric(url: str, name: str) -> float:
    body = httpx.get(url, timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", body, re.MULTILINE)
    assert match, f"{name} not in {url}:\n{body[:2000]}"
    return float(match.group(1))


def _eventually(check: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


PROMPT = "The swarm is"


def test_models_and_health(env: dict[str, Any]) -> None:
    ids = [m.id for m in _client(env).models.list().data]
    assert ids == [env["ckpt"]]
    health = httpx.get(env["url"] + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["missing_blocks"] == []


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_equals_transformers(env: dict[str, Any], stream: bool) -> None:
    ids = list(env["tok"](PROMPT).input_ids)
    text, n, eos = _expected(env, ids, 24, do_sample=False)
    client = _client(env)
    if stream:
        chunks = list(
            client.completions.create(model=env["ckpt"], prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        )  # fmt: skip
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        result = client.completions.create(model=env["ckpt"], prompt=PROMPT, max_tokens=24, temperature=0)
        got, finish, usage = result.choices[0].text, [result.choices[0].finish_reason], result.usage
    assert got == text
    assert finish == ["stop" if eos else "length"]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(ids), n)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_completion_equals_transformers(env: dict[str, Any], stream: bool) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, swarm!"}]
    ids = _chat_ids(env, messages)
    text, n, _ = _expected(env, ids, 20, do_sample=False)
    client = _client(env)
    if stream:
        chunks = list(
            client.chat.completions.create(model=env["ckpt"], messages=messages, max_tokens=20, temperature=0,  # type: ignore[arg-type]
                                           stream=True, stream_options={"include_usage": True})
        )  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        result = client.chat.completions.create(
            model=env["ckpt"], messages=messages, max_tokens=20, temperature=0
        )  # type: ignore[arg-type]
        got, usage = result.choices[0].message.content, result.usage
    assert got == text
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(ids), n)


def test_seeded_sampling_equals_transformers_sampling(env: dict[str, Any]) -> None:
    ids = list(env["tok"](PROMPT).input_ids)
    text, _, _ = _expected(env, ids, 16, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=7)
    result = _client(env).completions.create(
        model=env["ckpt"], prompt=PROMPT, max_tokens=16, temperature=0.8, top_p=0.9, seed=7
    )
    assert result.choices[0].text == text


def test_draft_greedy_equals_plain_and_sampling_is_seeded(env: dict[str, Any]) -> None:
    """`potluck api --draft`: greedy output is the plain output token for token (logprobs too); sampling with a
    seed repeats; the metrics show the draft proposed tokens and the swarm kept some."""
    ids = list(env["tok"](PROMPT).input_ids)
    text, n, _ = _expected(env, ids, 24, do_sample=False)
    plain, drafted = _client(env), _client(env, url=env["draft_url"])
    greedy = dict(model=env["ckpt"], prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1)
    want, got = plain.completions.create(**greedy), drafted.completions.create(**greedy)  # type: ignore[call-overload]
    assert got.choices[0].text == want.choices[0].text == text
    assert got.usage is not None and got.usage.completion_tokens == n
    lp_want, lp_got = want.choices[0].logprobs, got.choices[0].logprobs
    assert lp_want is not None and lp_got is not None and lp_got.token_logprobs is not None
    assert lp_got.token_logprobs == pytest.approx(lp_want.token_logprobs, abs=1e-4)
    sampled = dict(model=env["ckpt"], prompt=PROMPT, max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    first, again = (drafted.completions.create(**sampled).choices[0].text for _ in range(2))  # type: ignore[call-overload]
    assert first == again
    metrics = env["draft_url"] + "/metrics"
    assert _metric(metrics, "potluck_api_draft_accepted") > 0
    assert _metric(metrics, "potluck_api_draft_proposed") > _metric(metrics, "potluck_api_draft_accepted")


def test_eight_concurrent_streams(env: dict[str, Any]) -> None:
    prompts = [f"Request number {i} says" for i in range(8)]
    expected = [_expected(env, list(env["tok"](p).input_ids), 16, do_sample=False)[0] for p in prompts]
    client = _client(env)

    def run(prompt: str) -> str:
        stream = client.completions.create(
            model=env["ckpt"], prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, prompts))
    assert got == expected


def test_stop_sequence_and_logprobs(env: dict[str, Any]) -> None:
    ids = list(env["tok"](PROMPT).input_ids)
    full, _, _ = _expected(env, ids, 24, do_sample=False)
    stop = full[5:7]  # a string that occurs in the greedy continuation
    cut = full[: full.index(stop)]
    client = _client(env)
    result = client.completions.create(
        model=env["ckpt"], prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert (result.choices[0].text, result.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(
        model=env["ckpt"], prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut
    with_lp = client.completions.create(
        model=env["ckpt"], prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = with_lp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(
        max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )


def test_bad_parameters_are_400(env: dict[str, Any]) -> None:
    client = _client(env)
    for bad in ({"n": 2}, {"temperature": 7.0}, {"max_tokens": 100_000}, {"top_p": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=env["ckpt"], prompt=PROMPT, **bad)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    raw = httpx.post(
        env["url"] + "/v1/chat/completions",
        json={"model": env["ckpt"]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"


def test_wrong_or_missing_key_is_401(env: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        _client(env, key="wrong").completions.create(model=env["ckpt"], prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert httpx.get(env["url"] + "/v1/models").status_code == 401


@pytest.mark.parametrize("stream", [False, True])
def test_missing_blocks_are_503_naming_them(env: dict[str, Any], stream: bool) -> None:
    client = _client(env, url=env["partial_url"])
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=env["ckpt"], prompt=PROMPT, max_tokens=4, stream=stream)
    assert e.value.status_code == 503
    assert e.value.code == "missing_blocks"
    assert "3-7" in e.value.message and "[3, 4, 5, 6, 7]" in e.value.message
    health = httpx.get(env["partial_url"] + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["missing_blocks"] == [3, 4, 5, 6, 7]


def _long_prompt(env: dict[str, Any], new: int) -> str:
    """A prompt whose greedy continuation runs `new` tokens without eos, so only a hang-up ends it early."""
    cache = env.setdefault("long_prompts", {})
    if new in cache:
        return str(cache[new])
    for i in range(20):
        prompt = f"Tell a long story {i}:"
        _, n, eos = _expected(env, list(env["tok"](prompt).input_ids), new, do_sample=False)
        if not eos:
            cache[new] = prompt
            return prompt
    raise AssertionError("no prompt without eos")


def test_server_metrics_step_counter_rises_during_generation(env: dict[str, Any]) -> None:
    url = env["server_metrics"][0]
    before = _metric(url, "potluck_server_inference_steps_total")
    prompt = _long_prompt(env, 40)
    body = {"model": env["ckpt"], "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", env["url"] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        during = _metric(url, "potluck_server_inference_steps_total")
        rest = [line for line in lines if line.startswith("data:")]
    after = _metric(url, "potluck_server_inference_steps_total")
    assert rest[-1] == "data: [DONE]"
    assert before < during < after
    assert after - before == 40  # a prefill step and 39 decode steps (the last token is never fed)


def test_client_hanging_up_frees_server_cache(env: dict[str, Any]) -> None:
    used = "potluck_server_cache_tokens_used"
    assert _eventually(
        lambda: all(_metric(u, used) == 0 for u in env["server_metrics"])
    )  # earlier tests' sessions
    prompt = _long_prompt(env, 200)
    body = {"model": env["ckpt"], "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    steps_before = _metric(env["server_metrics"][0], "potluck_server_inference_steps_total")
    with httpx.stream("POST", env["url"] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep it referenced: a dropped iterator closes the response
        received = 0
        while received < 3:
            received += next(lines).startswith("data: {")
        held = [_metric(u, used) for u in env["server_metrics"]]
        assert all(h > 0 for h in held), held  # the session holds cache on both servers
        r.close()  # hang up mid-stream
    assert _eventually(lambda: all(_metric(u, used) == 0 for u in env["server_metrics"]))
    assert _metric(env["url"] + "/metrics", "potluck_api_cancelled_total") == 1
    steps = _metric(env["server_metrics"][0], "potluck_server_inference_steps_total")
    assert steps - steps_before < 200  # stopped early, not run to max_tokens
    time.sleep(1.0)  # and nothing keeps generating for the departed client
    assert _metric(env["server_metrics"][0], "potluck_server_inference_steps_total") == steps


def test_chat_command_streams_in_one_session(env: dict[str, Any]) -> None:
    opened = "potluck_server_requests_total"
    sessions_before = [_metric(u, f'{opened}{{rpc="inference"}}') for u in env["server_metrics"]]
    first = "Hello!"
    expected, _, _ = _expected(env, _chat_ids(env, [{"role": "user", "content": first}]), 12, do_sample=False)
    proc = subprocess.run(
        [sys.executable, "-m", "potluck.cli.main", "chat", env["ckpt"], "--initial-peers", *env["peers"],
         "--host", "127.0.0.1", "--max-new-tokens", "12"],
        input=f"{first}\nAnd then?\n", capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("assistant> ") == 2
    assert proc.stdout.startswith(f"assistant> {expected}\n")  # streamed as generated, then a newline
    sessions_after = [_metric(u, f'{opened}{{rpc="inference"}}') for u in env["server_metrics"]]
    assert [b - a for a, b in zip(sessions_before, sessions_after, strict=True)] == [1, 1]


def test_non_streamed_client_hanging_up_frees_server_cache(env: dict[str, Any]) -> None:
    used = "potluck_server_cache_tokens_used"
    assert _eventually(lambda: all(_metric(u, used) == 0 for u in env["server_metrics"]))
    cancelled = _metric(env["url"] + "/metrics", "potluck_api_cancelled_total")
    steps_before = _metric(env["server_metrics"][0], "potluck_server_inference_steps_total")
    body = {"model": env["ckpt"], "prompt": _long_prompt(env, 200), "max_tokens": 200, "temperature": 0}
    steps = "potluck_server_inference_steps_total"

    async def hang_up() -> (
        None
    ):  # the client gives up once the generation is under way, closing its connection
        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            request = asyncio.create_task(
                client.post(env["url"] + "/v1/completions", json=body, headers=headers)
            )
            while await asyncio.to_thread(_metric, env["server_metrics"][0], steps) == steps_before:
                assert not request.done(), request.result().text
                await asyncio.sleep(0.05)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(hang_up())
    assert _eventually(lambda: all(_metric(u, used) == 0 for u in env["server_metrics"]))
    assert _metric(env["url"] + "/metrics", "potluck_api_cancelled_total") == cancelled + 1
    assert _metric(env["server_metrics"][0], "potluck_server_inference_steps_total") - steps_before < 200
