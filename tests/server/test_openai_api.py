"""The OpenAI-compatible API through the unmodified `openai` client, over real HTTP with SmolLM2."""

import json
import time

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_completion_equals_generates_greedy_text_with_usage_and_logprobs(oai, client):
    native = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0,
                                                "logprobs": True}).json()
    resp = oai.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    choice = resp.choices[0]
    assert choice.text == native["text"] and "Paris" in choice.text
    assert choice.finish_reason == native["finish_reason"]
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == "base"
    assert abs(resp.created - time.time()) < 60
    assert resp.usage.completion_tokens == len(native["token_ids"]) == native["usage"]["completion_tokens"]
    assert resp.usage.prompt_tokens == native["usage"]["prompt_tokens"] > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.logprobs.token_logprobs == pytest.approx(native["logprobs"], abs=1e-4)
    assert "".join(choice.logprobs.tokens).startswith(choice.text)
    assert choice.logprobs.text_offset[0] == 0


def test_completion_stream_adds_up_and_ends_with_usage(oai):
    whole = oai.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(oai.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert all(c.usage is None for c in text_chunks)


def test_chat_stops_at_end_of_turn_streamed_or_not(oai, client):
    messages = [{"role": "user", "content": "Say hello."}]
    native = client.post("/v1/generate", json={"messages": messages, "max_new_tokens": 64, "temperature": 0}).json()
    resp = oai.chat.completions.create(model="base", messages=messages, temperature=0)  # no max_tokens: until EOS
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == native["text"] and choice.message.content and "<|im_end|>" not in native["text"]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.completion_tokens == native["usage"]["completion_tokens"]

    chunks = list(oai.chat.completions.create(model="base", messages=messages, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_is_sse_ending_with_done(client):
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 3 and json.loads(events[-3])["choices"][0]["finish_reason"] == "length"


def test_models_list_names_base_and_the_backbone(oai, server):
    ids = [m.id for m in oai.models.list().data]
    assert ids[0] == "base" and server[1].backbone.name in ids
    backbone_name = oai.completions.create(model=server[1].backbone.name, prompt=PROMPT, max_tokens=2,
                                           temperature=0)
    assert backbone_name.choices[0].text == oai.completions.create(model="base", prompt=PROMPT, max_tokens=2,
                                                                   temperature=0).choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_not_found_before_any_stream(oai, stream):
    with pytest.raises(openai.NotFoundError, match="task 'nope' is not registered"):
        oai.completions.create(model="nope", prompt="hi", max_tokens=2, stream=stream)
    with pytest.raises(openai.NotFoundError, match="task 'nope' is not registered"):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=stream)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 17}, "less than or equal to 16"),
    ({"n": 3, "best_of": 2}, "expected best_of >= n"),
    ({"best_of": 3, "stream": True}, "cannot stream"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"prompt": ["one"] * 33}, "at most 32 prompts"),
    ({"prompt": ["one", [1, 2]]}, "mixing"),
    ({"logprobs": 21}, "less than or equal to 20"),
    ({"suffix": "tail"}, "suffix"),
    ({"logit_bias": {"hello": 5}}, "token ids"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias keys must be token ids in"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "regex output format cannot be compiled"),
    ({"extra_body": {"guided_regex": "[0-9]+", "guided_choice": ["a"]}}, "at most one structured output"),
])
def test_bad_completion_requests_are_400s_that_say_why(oai, kwargs, message):
    args = {"model": "base", "prompt": "hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError, match=message):
        oai.completions.create(**args)


def test_bad_chat_requests_are_400s_that_say_why(oai):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="needs logprobs true"):
        oai.chat.completions.create(model="base", messages=hi, top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        oai.chat.completions.create(model="base", messages=hi, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="json_schema output format cannot be compiled"):
        oai.chat.completions.create(model="base", messages=hi, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "a"}}})
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model="base", messages=[])


def test_same_seed_samples_the_same_text(oai):
    def sample(seed):
        return oai.completions.create(model="base", prompt="My favourite colour is", max_tokens=8, temperature=1.0,
                                      seed=seed).choices[0].text
    assert sample(1234) == sample(1234)


def test_vllm_extension_fields_pass_through(oai):
    greedy = oai.completions.create(model="base", prompt="Once upon a time", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    top_k_1 = oai.completions.create(model="base", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                     extra_body={"top_k": 1, "ignore_eos": True, "min_tokens": 3,
                                                 "a_field_from_the_future": {"x": 1}})
    assert top_k_1.choices[0].text == greedy.choices[0].text
    assert top_k_1.choices[0].finish_reason == "length" and top_k_1.usage.completion_tokens == 6


def test_leaving_a_stream_aborts_the_request(oai, server):
    sync = server[1]
    stream = oai.completions.create(model="base", prompt="Tell me a long story.", max_tokens=2000, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client leaves after the first chunk
    deadline = time.monotonic() + 20
    while sync.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sync.has_unfinished()
    assert sync.pages.num_free_pages == sync.pages.num_pages
