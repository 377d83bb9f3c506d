"""/health, /ready and /v1/generate over real HTTP (uvicorn on loopback) with SmolLM2."""

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"


def test_generate_json_is_greedy_and_counts_usage(client):
    body = {"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}
    first, second = client.post("/v1/generate", json=body), client.post("/v1/generate", json=body)
    assert first.status_code == 200, first.text
    data = first.json()
    assert "Paris" in data["text"] and data["text"] == second.json()["text"]
    assert data["usage"]["completion_tokens"] == len(data["token_ids"]) <= 8
    assert data["finish_reason"] in ("stop", "length")


def test_generate_chat_messages_stop_at_end_of_turn(client):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_new_tokens": 64, "temperature": 0}
    data = client.post("/v1/generate", json=body).json()
    assert data["finish_reason"] == "stop" and data["text"] and "<|im_end|>" not in data["text"]


def test_stream_sends_sse_deltas_that_add_up(client):
    body = {"prompt": "Once upon a time", "max_new_tokens": 12, "temperature": 0}
    whole = client.post("/v1/generate", json=body).json()
    events = []
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e) for e in events[:-1]]
    assert "".join(d["text"] for d in deltas) == whole["text"]
    assert deltas[-1]["finish_reason"] == whole["finish_reason"]


def test_stop_string_is_cut_from_text_and_stream(client):
    body = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_new_tokens": 20, "temperature": 0, "stop": [" 8"]}
    data = client.post("/v1/generate", json=body).json()
    assert data["finish_reason"] == "stop" and "8" not in data["text"] and "7" in data["text"]
    streamed = []
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as resp:
        streamed = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(d["text"] for d in streamed) == data["text"]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "", "max_new_tokens": 4}, "prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"prompt": "hi", "temperature": -1}, "temperature must be a finite number >= 0"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one of 'prompt' or 'messages'"),
    ({"prompt": "word " * 9000}, "context holds 8192"),
])
def test_bad_input_is_a_400_with_a_clear_message(client, body, message):
    resp = client.post("/v1/generate", json=body)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]["message"]
    assert client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_unknown_task_is_a_404(client):
    resp = client.post("/v1/generate", json={"prompt": "hi", "task": "nope"})
    assert resp.status_code == 404 and "task 'nope' is not registered" in resp.json()["error"]["message"]


def test_non_finite_temperature_over_http_is_a_400(client):
    raw = '{"prompt": "hi", "temperature": NaN}'
    resp = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400


def test_client_disconnect_aborts_and_frees_pages(server):
    base_url, sync = server
    body = {"prompt": "Tell me a long story.", "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as c, c.stream("POST", "/v1/generate", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token: the connection closes
    deadline = time.monotonic() + 20
    while sync.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sync.has_unfinished()
    assert sync.pages.num_free_pages == sync.pages.num_pages
