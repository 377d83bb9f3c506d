"""The Python SDK: against the real server (SmolLM2 under uvicorn) for generation, streaming, tasks and
typed errors; against httpx.MockTransport (httpx's own test transport) for the retry policy alone."""

import asyncio
import contextlib
import json
import time

import httpx
import pytest
import torch

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.clients import (
    AsyncPrefixServeClient,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PrefixServeClient,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)

slow = pytest.mark.slow
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPT = "The capital of France is"
TASK_PROMPT = "The weather today is"  # a prompt a random prompt adapter visibly changes


@pytest.fixture
def sdk(server):
    with PrefixServeClient(server[0], timeout=60) as client:
        yield client


def prompt_artifact(sync, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=g) * 0.5
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)


def wait_until_idle(sync, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while sync.has_unfinished():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@slow
def test_generate_equals_the_http_api(sdk, server):
    plain = httpx.post(f"{server[0]}/v1/generate", json={"prompt": PROMPT, **GREEDY}, timeout=60).json()
    out = sdk.generate(PROMPT, **GREEDY)
    assert out.text == plain["text"] and out.token_ids == plain["token_ids"] and "Paris" in out.text
    assert out.usage["completion_tokens"] == len(out.token_ids) == 8 and out.finish_reason == "length"
    assert sdk.health() == {"status": "ok"} and sdk.ready()["status"] == "ready"


@slow
def test_stream_adds_up_and_an_early_break_aborts_the_request(sdk, server):
    whole = sdk.generate(PROMPT, **GREEDY)
    deltas = list(sdk.stream_generate(PROMPT, **GREEDY))
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])

    # 1500 tokens take far longer than the deadline on CPU: only an abort makes the engine idle in time.
    for delta in sdk.stream_generate(PROMPT, max_new_tokens=1500, temperature=0, ignore_eos=True):
        assert delta.token_ids and server[1].has_unfinished()
        break
    assert wait_until_idle(server[1], timeout_s=5), "the engine still runs the request the client abandoned"


@slow
def test_task_lifecycle(sdk, server):
    v1 = sdk.upload_task("sdk-faq", prompt_artifact(server[1], 1))["version"]
    uploaded = sdk.upload_task("sdk-faq", prompt_artifact(server[1], 2))
    v2 = uploaded["version"]
    assert uploaded["kind"] == "prompt" and uploaded["task"] == "sdk-faq" and v1 != v2
    assert {"task": "sdk-faq", "version": v2} in sdk.list_tasks()
    shown = sdk.get_task("sdk-faq")
    assert shown["version"] == v2 and [h["version"] for h in shown["history"]] == [v2, v1]
    on_v2 = sdk.generate(TASK_PROMPT, task="sdk-faq", **GREEDY).token_ids
    assert on_v2 != sdk.generate(TASK_PROMPT, **GREEDY).token_ids

    assert sdk.rollback_task("sdk-faq") == {"task": "sdk-faq", "version": v1}
    assert sdk.generate(TASK_PROMPT, task="sdk-faq", **GREEDY).token_ids != on_v2
    assert sdk.rollback_task("sdk-faq", version=v2)["version"] == v2
    assert sdk.generate(TASK_PROMPT, task="sdk-faq", **GREEDY).token_ids == on_v2

    assert sdk.delete_task("sdk-faq") == {"task": "sdk-faq", "deleted": True}
    with pytest.raises(NotFoundError) as caught:
        sdk.get_task("sdk-faq")
    assert caught.value.status == 404 and caught.value.message == "task 'sdk-faq' is not registered"


@slow
def test_upload_a_peft_folder(sdk, smollm2_hf, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    folder = tmp_path / "my-prompt"
    get_peft_model(smollm2_hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(folder)
    uploaded = sdk.upload_task("sdk-peft", folder)
    assert uploaded["kind"] == "prompt" and len(uploaded["version"]) == 64
    assert sdk.generate(PROMPT, task="sdk-peft", **GREEDY).token_ids
    sdk.delete_task("sdk-peft")


@slow
def test_server_errors_are_typed(sdk):
    with pytest.raises(NotFoundError, match="'nope' is not registered") as caught:
        sdk.generate(PROMPT, task="nope")
    assert caught.value.type == "task_not_found"
    with pytest.raises(NotFoundError, match="'nope' is not registered"):
        next(sdk.stream_generate(PROMPT, task="nope"))
    with pytest.raises(BadRequestError) as caught:
        sdk.generate(PROMPT, max_new_tokens=0)
    assert caught.value.status == 400 and "max_new_tokens" in caught.value.message
    with pytest.raises(PayloadTooLargeError, match="limited to 8388608 bytes"):
        sdk.upload_task("big", b"\0" * (9 << 20))
    with pytest.raises(BadRequestError):
        sdk.upload_task("junk", b"certainly not an adapter")
    with pytest.raises(ValueError, match="exactly one of 'prompt' or 'messages'"):  # caught before sending
        sdk.generate()


@slow
def test_async_client(sdk, server):
    async def main():
        async with AsyncPrefixServeClient(server[0], timeout=60) as client:
            whole = await client.generate(PROMPT, **GREEDY)
            async with contextlib.aclosing(client.stream_generate(PROMPT, **GREEDY)) as stream:
                deltas = [d async for d in stream]
            with pytest.raises(NotFoundError, match="'nope' is not registered"):
                await client.generate(PROMPT, task="nope")
            async with contextlib.aclosing(client.stream_generate(PROMPT, max_new_tokens=1500, temperature=0,
                                                                  ignore_eos=True)) as stream:
                async for _ in stream:
                    break
            return whole, deltas

    whole, deltas = asyncio.run(main())
    assert whole.text == sdk.generate(PROMPT, **GREEDY).text
    assert "".join(d.text for d in deltas) == whole.text and deltas[-1].finish_reason == "length"
    assert wait_until_idle(server[1], timeout_s=5)


# The retry policy alone, over httpx.MockTransport: no server, a fake clock.

def scripted(*responses: httpx.Response):
    """A MockTransport handler answering `responses` in order (the last one repeats) and recording requests."""
    requests = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return responses[min(len(requests), len(responses)) - 1]
    return handle, requests


def error(status: int, kind: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"type": kind, "message": f"{kind} says no"}}, headers=headers)


def mock_client(handle, sleeps: list, **kwargs) -> PrefixServeClient:
    return PrefixServeClient("http://mock", transport=httpx.MockTransport(handle), sleep=sleeps.append, **kwargs)


def test_retries_503_waiting_retry_after_then_succeeds():
    handle, requests = scripted(error(503, "overloaded", "2"), error(503, "overloaded", "2"),
                                httpx.Response(200, json={"status": "ok"}))
    sleeps = []
    with mock_client(handle, sleeps, api_key="sk-test") as client:
        assert client.health() == {"status": "ok"}
    assert sleeps == [2.0, 2.0] and len(requests) == 3
    assert requests[0].headers["Authorization"] == "Bearer sk-test"


def test_gives_up_after_max_retries_with_the_wait_capped():
    handle, requests = scripted(error(429, "rate_limited", "120"))
    sleeps = []
    with mock_client(handle, sleeps, max_retries=3, max_retry_wait_s=30) as client, \
            pytest.raises(RateLimitError, match="rate_limited says no") as caught:
        client.list_tasks()
    assert sleeps == [30.0, 30.0, 30.0] and len(requests) == 4 and caught.value.retry_after_s == 120


def test_backs_off_exponentially_with_jitter_without_retry_after():
    handle, requests = scripted(error(503, "store_unavailable"))
    sleeps = []
    with mock_client(handle, sleeps, max_retries=2) as client, pytest.raises(ServiceUnavailableError):
        client.get_task("x")
    assert len(requests) == 3 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0


@pytest.mark.parametrize("response, error_type", [
    (error(500, "internal_error", "1"), ServerError),
    (error(400, "invalid_request"), BadRequestError),
    (error(404, "task_not_found"), NotFoundError),
    (httpx.Response(502, text="bad gateway"), ServerError),
])
def test_other_statuses_are_never_retried(response, error_type):
    handle, requests = scripted(response)
    sleeps = []
    with mock_client(handle, sleeps) as client, pytest.raises(error_type):
        client.health()
    assert sleeps == [] and len(requests) == 1


def sse(*events) -> httpx.Response:
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


DELTA = {"text": "Hi", "token_ids": [1], "finish_reason": None}


def test_a_stream_is_retried_only_before_it_started():
    handle, requests = scripted(error(503, "overloaded", "1"),
                                sse(DELTA, {"error": {"type": "overloaded", "message": "engine full"}}))
    sleeps = []
    with mock_client(handle, sleeps) as client:
        stream = client.stream_generate("x")
        assert next(stream).text == "Hi"
        with pytest.raises(ServiceUnavailableError, match="engine full"):  # mid-stream: typed, not retried
            next(stream)
    assert sleeps == [1.0] and len(requests) == 2


def test_a_stream_cut_before_done_raises():
    handle, _ = scripted(sse(DELTA))
    with mock_client(handle, []) as client, pytest.raises(Exception, match="ended before its \\[DONE\\]"):
        list(client.stream_generate("x"))


def test_async_client_retries_with_its_own_sleep():
    handle, requests = scripted(error(429, "rate_limited", "3"), sse(DELTA, {**DELTA, "finish_reason": "length"},
                                                                     "[DONE]"))
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)

    async def main():
        async with AsyncPrefixServeClient("http://mock", transport=httpx.MockTransport(handle), sleep=sleep) as c:
            return [d.finish_reason async for d in c.stream_generate("x")]

    assert asyncio.run(main()) == [None, "length"] and sleeps == [3.0] and len(requests) == 2
