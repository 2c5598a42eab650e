"""Pure parts of the API: stop-sequence text tracking, request validation, model listing, the model-less app."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from tiny_tokenizer import make_tokenizer

from potluck.api import schemas
from potluck.api.app import create_app
from potluck.api.engine import TextTracker
from potluck.server import metrics as server_metrics
from potluck.swarm.directory import models_from_entries


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer(256)


def _feed(tok: Any, tracker: TextTracker, text: str) -> tuple[list[str], bool]:
    deltas = []
    for token_id in tok(text, add_special_tokens=False).input_ids:
        delta, stopped = tracker.add(token_id)
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas, False


def test_text_tracker_without_stops_releases_each_token(tok: Any) -> None:
    deltas, stopped = _feed(tok, TextTracker(tok), "abc def")
    assert deltas == list("abc def") and not stopped


def test_text_tracker_holds_back_a_possible_stop_and_cuts_at_it(tok: Any) -> None:
    tracker = TextTracker(tok, ["END"])
    deltas, stopped = _feed(tok, tracker, "xyENyENDtail")
    assert stopped
    assert "".join(deltas) == "xyENy"
    assert deltas[2:4] == ["", ""]  # "E", "EN" might have started the stop sequence: held back


def test_text_tracker_flushes_a_held_prefix_at_the_end(tok: Any) -> None:
    tracker = TextTracker(tok, ["STOP"])
    deltas, stopped = _feed(tok, tracker, "abST")
    assert not stopped and "".join(deltas) == "ab"
    assert tracker.flush() == "ST"


def test_text_tracker_stop_spanning_several_tokens_and_earliest_wins(tok: Any) -> None:
    deltas, stopped = _feed(tok, TextTracker(tok, ["cd", "bcd"]), "abcde")
    assert stopped and "".join(deltas) == "a"


def test_request_validation() -> None:
    ok = schemas.CompletionRequest(model="m", prompt="hi", stop="x")
    assert ok.stop_sequences() == ("x",) and ok.max_tokens == 16
    for bad in ({"n": 2}, {"temperature": -1}, {"top_p": 0}, {"stop": ["a"] * 5}, {"echo": True},
                {"presence_penalty": 0.5}, {"max_tokens": 0}, {"prompt": []}):  # fmt: skip
        with pytest.raises(ValidationError):
            schemas.CompletionRequest(**{"model": "m", "prompt": "hi", **bad})
    chat = schemas.ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_completion_tokens=5, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert chat.messages[0].text() == "ab" and chat.token_budget() == 5 and chat.num_logprobs() == 2
    with pytest.raises(ValidationError):
        schemas.ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "x"}])


def test_model_entries_drop_hostile_values() -> None:
    entries = [{"prefix": "good", "num_blocks": 8}, {"prefix": "bad.dot", "num_blocks": 8}, {"prefix": "neg", "num_blocks": -1},
               {"prefix": "str", "num_blocks": "8"}, {"prefix": "big", "num_blocks": 10**9}, {"prefix": "x" * 500, "num_blocks": 1},
               3, {"prefix": "good", "num_blocks": 80}, {"prefix": "good", "num_blocks": 8}]  # fmt: skip
    models = models_from_entries({f"peer{i}": value for i, value in enumerate(entries)})
    assert {prefix: r.num_blocks for prefix, r in models.items()} == {"good": 8}  # the majority's depth wins


def test_model_less_app_serves_dashboard_metrics_and_openai_errors() -> None:
    with TestClient(create_app(None, None)) as client:
        assert "potluck swarm" in client.get("/").text
        assert client.get("/static/dashboard.js").status_code == 200
        assert client.get("/v1/models").json() == {"object": "list", "data": []}
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_model"
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (
            'potluck_api_requests_total{endpoint="/v1/completions",status="400"} 2.0'
            in client.get("/metrics").text
        )


def test_api_key_guards_the_openai_routes_only() -> None:
    with TestClient(create_app(None, None, api_key="k")) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/").status_code == 200 and client.get("/metrics").status_code == 200


def test_server_metrics_count_steps() -> None:
    before = server_metrics.INFERENCE_STEPS._value.get()
    server_metrics.count_step(batch=3, tokens=2)
    assert server_metrics.INFERENCE_STEPS._value.get() == before + 1
    assert server_metrics.TOKENS.labels("inference")._value.get() >= 6
