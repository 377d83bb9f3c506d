"""Malformed request bodies over real HTTP: each is a 400 that says what was expected and what was
found, and the server goes on serving (no 500, nothing left in the engine)."""

import json

import pytest

from prefixserve.engine.request import MAX_STOP_CHARS

pytestmark = pytest.mark.slow

LONE_SURROGATE = '"hi \\ud800 there"'  # a JSON escape that is valid JSON but no Unicode text
CHAT = '[{"role": "user", "content": ' + LONE_SURROGATE + '}]'


def post_raw(client, path: str, raw: str):
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def assert_400(resp, *needles: str) -> None:
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message


def assert_still_serving(client, server) -> None:
    assert client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200
    assert not server[1].has_unfinished()


@pytest.mark.parametrize("path, raw", [
    ("/v1/generate", '{"prompt": ' + LONE_SURROGATE + ', "max_new_tokens": 2}'),
    ("/v1/generate", '{"messages": ' + CHAT + ', "max_new_tokens": 2}'),
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "stop": ' + LONE_SURROGATE + '}'),
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "stop": ["ok", ' + LONE_SURROGATE + ']}'),
    ("/v1/completions", '{"model": "base", "prompt": ' + LONE_SURROGATE + ', "max_tokens": 2}'),
    ("/v1/completions", '{"model": "base", "prompt": "hi", "max_tokens": 2, "stop": ' + LONE_SURROGATE + '}'),
    ("/v1/chat/completions", '{"model": "base", "messages": ' + CHAT + ', "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": ' + LONE_SURROGATE + '}]}], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
                             '"max_tokens": 2, "stop": [' + LONE_SURROGATE + ']}'),
])
def test_a_lone_surrogate_is_a_400_that_says_so(client, server, path, raw):
    assert_400(post_raw(client, path, raw), "lone surrogate", "U+D800")
    assert_still_serving(client, server)


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_deeply_nested_body_is_a_400(client, server, path):
    depth = 100_000
    assert_400(post_raw(client, path, "[" * depth + "]" * depth), "nested")
    assert_400(post_raw(client, path, '{"prompt": ' + "[" * depth + "]" * depth + "}"), "nested")
    assert_still_serving(client, server)


def test_a_stop_string_longer_than_the_limit_is_a_400_naming_both_lengths(client, server):
    at_limit = {"prompt": "Hi", "max_new_tokens": 2, "stop": ["x" * MAX_STOP_CHARS]}
    assert client.post("/v1/generate", json=at_limit).status_code == 200
    too_long = "x" * (MAX_STOP_CHARS + 1)
    assert_400(client.post("/v1/generate", json={"prompt": "Hi", "stop": ["ok", too_long]}),
               str(MAX_STOP_CHARS), str(MAX_STOP_CHARS + 1))
    for path, body in [("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        assert_400(client.post(path, json={"model": "base", "stop": too_long, **body}), str(MAX_STOP_CHARS))
    documented = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]["stop"]
    assert {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS} in documented["anyOf"]
    assert_still_serving(client, server)


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": "Hi", "max_new_tokens": "5"}),
    ("/v1/generate", {"prompt": "Hi", "temperature": "0"}),
    ("/v1/generate", {"prompt": "Hi", "stream": "false"}),
    ("/v1/generate", {"prompt": "Hi", "logprobs": 1}),
    ("/v1/generate", {"prompt": "Hi", "top_k": 2.0}),
    ("/v1/generate", {"prompt": "Hi", "stop_token_ids": ["2"]}),
    ("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": "5"}),
    ("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2, "logprobs": "1"}),
    ("/v1/completions", {"model": "base", "prompt": "Hi", "seed": "3"}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": "5"}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                              "stream": "true"}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                              "top_p": "0.5"}),
])
def test_numbers_and_booleans_sent_as_strings_are_400s(client, path, body):
    resp = client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert "valid" in resp.json()["error"]["message"]


def test_integers_are_still_accepted_where_floats_are_expected(client):
    for path, body in [("/v1/generate", {"prompt": "Hi", "max_new_tokens": 2, "temperature": 0, "top_p": 1}),
                       ("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0,
                                            "top_p": 1, "presence_penalty": 0})]:
        resp = client.post(path, json=body)
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_structured_outputs_are_honoured_and_bad_ones_refused(client, path, body):
    base = {"model": "base", "max_tokens": 2, **body}
    for response_format, needle in [
        ({"type": "json_schema"}, "expected json_schema exactly when type is 'json_schema'"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "maxProperties": -1}}},
         "cannot be compiled"),
    ]:
        assert_400(client.post(path, json={**base, "response_format": response_format}), needle)
    raw = json.dumps({**base, "guided_regex": "@"}).replace('"@"', LONE_SURROGATE)
    assert_400(post_raw(client, path, raw), "guided_regex", "unicode")
    for honoured in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object"}}}):
        resp = client.post(path, json={**base, "response_format": honoured})
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert (choice.get("text") or choice.get("message", {}).get("content")).startswith("{")
    for fine in ({"type": "text"}, None):
        resp = client.post(path, json={**base, "response_format": fine})
        assert resp.status_code == 200, resp.text


def test_tools_are_refused_not_ignored(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_400(client.post("/v1/chat/completions", json={**body, "tools": [tool]}), "tools are not supported")
    assert client.post("/v1/chat/completions", json={**body, "tools": []}).status_code == 200


def test_the_openai_client_sees_an_uncompilable_schema_refused(server):
    import openai

    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60) as oai, \
            pytest.raises(openai.BadRequestError, match="json_schema output format cannot be compiled"):
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "x", "schema": {"type": "array", "minItems": "two"}}})
