"""Every field of the installed `openai` package's request types for `/v1/completions` and
`/v1/chat/completions`, each classified as honoured (a tiny request shows it took effect), refused
(a 400 that names it) or ignored (exactly `IGNORED_FIELDS`: the answer is the same without it).
A field a new `openai` release adds is in none of the three, and fails the walk until a person
classifies it here and, if need be, in the server."""

from __future__ import annotations

import json
from dataclasses import dataclass

import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.chat.chat_completion_stream_options_param import ChatCompletionStreamOptionsParam

from prefixserve.server.openai_protocol import IGNORED_FIELDS

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
OPEN_PROMPT = "My favourite colour is"  # many likely continuations: sampling shows
MESSAGES = [{"role": "user", "content": "Repeat the word cat."}]
TINY = {"model": "base", "max_tokens": 4, "temperature": 0}
ENDPOINTS = {  # endpoint -> the TypedDicts of its request body (stream is only in the two leaves)
    "completions": (completion_create_params.CompletionCreateParamsNonStreaming,
                    completion_create_params.CompletionCreateParamsStreaming),
    "chat": (chat_create_params.CompletionCreateParamsNonStreaming,
             chat_create_params.CompletionCreateParamsStreaming),
}


def keys(*typed_dicts) -> set[str]:
    return set().union(*(t.__required_keys__ | t.__optional_keys__ for t in typed_dicts))


def ignored(prefix: str = "") -> set[str]:
    """IGNORED_FIELDS' names at one level: top-level ones, or those under `prefix.`."""
    return {name[len(prefix):] for name in IGNORED_FIELDS
            if name.startswith(prefix) and "." not in name[len(prefix):]}


def create(oai, endpoint: str, **fields):
    """A tiny greedy request to `endpoint` with `fields` on top (PROMPT or MESSAGES unless given)."""
    body = {**TINY, **({"prompt": PROMPT} if endpoint == "completions" else {"messages": MESSAGES}), **fields}
    return (oai.completions if endpoint == "completions" else oai.chat.completions).create(**body)


def text(choice) -> str:
    return choice.text if hasattr(choice, "text") else choice.message.content


def texts(resp) -> list[str]:
    return [text(c) for c in resp.choices]


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].text if hasattr(c.choices[0], "text") else c.choices[0].delta.content or ""
                   for c in chunks if c.choices)


@pytest.fixture(scope="module")
def greedy(oai) -> dict[str, object]:
    """Each endpoint's answer to the tiny greedy request without any further field."""
    return {endpoint: create(oai, endpoint) for endpoint in ENDPOINTS}


# ---- honoured: each field's effect --------------------------------------------------------------
@dataclass
class Walk:
    """What a check needs: the client, the endpoint, its greedy answer without the field, and helpers."""

    oai: openai.OpenAI
    endpoint: str
    greedy: object
    client: object  # httpx, for the native API
    tokenizer: object

    def create(self, **fields):
        return create(self.oai, self.endpoint, **fields)

    @property
    def greedy_texts(self) -> list[str]:
        return texts(self.greedy)

    @property
    def open_prompt(self) -> dict:
        """A prompt with many likely answers, where sampling shows (chat's MESSAGES already is one)."""
        return {"prompt": OPEN_PROMPT} if self.endpoint == "completions" else {}


def check_model(w: Walk):
    assert w.create().model == "base"
    with pytest.raises(openai.NotFoundError, match="task 'no-such-task' is not registered"):
        w.create(model="no-such-task")


def check_prompt(w: Walk):
    ids = w.tokenizer(PROMPT).input_ids
    assert texts(w.create(prompt=ids)) == w.greedy_texts
    batch = w.create(prompt=[PROMPT, OPEN_PROMPT])
    assert [c.index for c in batch.choices] == [0, 1] and texts(batch)[0] == w.greedy_texts[0]
    assert texts(batch)[1] == texts(w.create(prompt=OPEN_PROMPT))[0]


def check_messages(w: Walk):
    native = w.client.post("/v1/generate", json={"messages": MESSAGES, "max_new_tokens": 4,
                                                  "temperature": 0}).json()
    assert w.greedy_texts == [native["text"]]
    assert texts(w.create(messages=[{"role": "user", "content": "Say hello."}])) != w.greedy_texts


def check_max_tokens(w: Walk):
    resp = w.create(max_tokens=2)
    assert resp.usage.completion_tokens == 2 and resp.choices[0].finish_reason == "length"
    assert w.greedy_texts[0].startswith(texts(resp)[0])


def check_max_completion_tokens(w: Walk):
    resp = w.create(max_tokens=4, max_completion_tokens=2)  # the newer name wins
    assert resp.usage.completion_tokens == 2 and resp.choices[0].finish_reason == "length"


def check_stop(w: Walk):
    whole = w.greedy_texts[0]
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    resp = w.create(stop=[stop])
    assert texts(resp) == [whole[:whole.index(stop)]] and resp.choices[0].finish_reason == "stop"


def check_seed(w: Walk):
    def sample(seed: int) -> list[str]:
        return texts(w.create(temperature=1.0, seed=seed, **w.open_prompt))
    first = sample(11)
    assert sample(11) == first
    assert len({str(first), str(sample(12)), str(sample(13))}) > 1


def check_temperature(w: Walk):
    # 0 is greedy, as top_k 1 is at temperature 1; a high temperature wanders off it
    assert texts(w.create(temperature=1.0, extra_body={"top_k": 1})) == w.greedy_texts
    assert any(texts(w.create(temperature=2.0, seed=seed)) != w.greedy_texts for seed in (1, 2))


def check_top_p(w: Walk):
    assert texts(w.create(temperature=1.0, top_p=1e-6, seed=5)) == w.greedy_texts


def check_n(w: Walk):
    resp = w.create(n=2, temperature=1.0, seed=21)
    assert [c.index for c in resp.choices] == [0, 1]
    assert texts(w.create(temperature=1.0, seed=22)) == texts(resp)[1:]  # choice i samples with seed + i
    assert resp.usage.prompt_tokens == w.greedy.usage.prompt_tokens


def check_best_of(w: Walk):
    fields = {"prompt": OPEN_PROMPT, "temperature": 1.0, "seed": 3}
    candidates = w.create(n=3, logprobs=0, **fields)  # the same three draws best_of makes
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates.choices}
    assert texts(w.create(best_of=3, **fields)) == [max(mean, key=mean.get)]


def check_logprobs(w: Walk):
    if w.endpoint == "completions":
        lp = w.create(logprobs=2).choices[0].logprobs
        assert "".join(lp.tokens) == w.greedy_texts[0] and len(lp.token_logprobs) == 4
        assert all(len(top) == 2 and top[t] == v == max(top.values())
                   for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    else:
        content = w.create(logprobs=True).choices[0].logprobs.content
        assert "".join(e.token for e in content) == w.greedy_texts[0] and len(content) == 4
        assert all(e.logprob <= 0 and e.top_logprobs == [] for e in content)


def check_top_logprobs(w: Walk):
    content = w.create(logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)


def check_echo(w: Walk):
    assert texts(w.create(echo=True)) == [PROMPT + w.greedy_texts[0]]


def check_logit_bias(w: Walk):
    (cat,) = w.tokenizer(" cat").input_ids
    assert texts(w.create(logit_bias={str(cat): 100})) == [" cat" * 4]


def check_penalty(w: Walk, name: str):
    # The greedy answers repeat a token by their 5th: a penalty on tokens already in the output shows.
    assert texts(w.create(max_tokens=5, **{name: 2.0})) != texts(w.create(max_tokens=5))


def check_response_format(w: Walk):
    assert texts(w.create(response_format={"type": "text"})) == w.greedy_texts
    schema = {"type": "string", "enum": ["red", "green"]}
    resp = w.create(max_tokens=8, response_format={"type": "json_schema", "json_schema": {
        "name": "colour", "schema": schema, "strict": True}})
    assert json.loads(texts(resp)[0]) in ("red", "green") and resp.choices[0].finish_reason == "stop"


def check_stream(w: Walk):
    assert streamed_text(w.create(stream=True)) == w.greedy_texts[0]


def check_stream_options(w: Walk):
    chunks = list(w.create(stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == w.greedy.usage
    assert all(c.usage is None for c in chunks[:-1]) and streamed_text(chunks) == w.greedy_texts[0]


HONOURED = {  # field -> the check that it took effect (on the endpoints whose types have it)
    "model": check_model, "prompt": check_prompt, "messages": check_messages, "max_tokens": check_max_tokens,
    "max_completion_tokens": check_max_completion_tokens, "stop": check_stop, "seed": check_seed,
    "temperature": check_temperature, "top_p": check_top_p, "n": check_n, "best_of": check_best_of,
    "logprobs": check_logprobs, "top_logprobs": check_top_logprobs, "echo": check_echo,
    "logit_bias": check_logit_bias, "presence_penalty": lambda w: check_penalty(w, "presence_penalty"),
    "frequency_penalty": lambda w: check_penalty(w, "frequency_penalty"), "response_format": check_response_format,
    "stream": check_stream, "stream_options": check_stream_options,
}
REFUSED = {  # field -> a value the server cannot serve (a 400 naming the field)
    "suffix": "and that is the end",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "web_search_options": {"search_context_size": "low"},
    "moderation": {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}},
}
IGNORED_VALUES = {  # field of IGNORED_FIELDS -> a plausible value a client sends
    "user": "user-1234", "safety_identifier": "5f0c3d", "store": True, "metadata": {"purpose": "test"},
    "service_tier": "flex", "prompt_cache_key": "walk", "prompt_cache_retention": "24h",
    "parallel_tool_calls": False, "prediction": {"type": "content", "content": "Paris"},
    "reasoning_effort": "low", "verbosity": "low", "prompt_cache_options": {"mode": "explicit", "ttl": "30m"},
}
STREAM_OPTIONS_HONOURED = {"include_usage"}  # checked by check_stream_options


def classification(endpoint: str) -> tuple[set[str], set[str], set[str], set[str]]:
    """The endpoint's fields and which of them are honoured, refused, ignored."""
    fields = keys(*ENDPOINTS[endpoint])
    return fields, set(HONOURED) & fields, set(REFUSED) & fields, ignored() & fields


def cases(kind: str) -> list[tuple[str, str]]:
    index = {"honoured": 1, "refused": 2, "ignored": 3}[kind]
    return [(endpoint, name) for endpoint in ENDPOINTS for name in sorted(classification(endpoint)[index])]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_field_is_honoured_refused_or_ignored(endpoint):
    fields, honoured, refused, ignored_here = classification(endpoint)
    unclassified = fields - honoured - refused - ignored_here
    assert not unclassified, (f"openai {openai.__version__} sends fields to /v1/{endpoint} that are neither honoured, "
                              f"refused nor in IGNORED_FIELDS: {sorted(unclassified)}; classify each (here, and in "
                              f"prefixserve/server/openai_protocol.py)")
    assert not (honoured & refused or honoured & ignored_here or refused & ignored_here), "one class per field"


def test_nothing_is_classified_that_no_endpoint_has():
    every = keys(*ENDPOINTS["completions"], *ENDPOINTS["chat"])
    stale = (set(HONOURED) | set(REFUSED) | ignored()) - every
    assert not stale, f"classified but in neither endpoint's types of openai {openai.__version__}: {sorted(stale)}"
    assert set(IGNORED_VALUES) == ignored(), "each ignored field needs a plausible value to send"
    options = keys(ChatCompletionStreamOptionsParam)
    assert STREAM_OPTIONS_HONOURED | ignored("stream_options.") == options, (
        f"stream_options fields unclassified: {sorted(options - STREAM_OPTIONS_HONOURED - ignored('stream_options.'))}")


@pytest.mark.parametrize("endpoint, name", cases("honoured"))
def test_honoured_field_takes_effect(oai, greedy, client, tokenizer, endpoint, name):
    HONOURED[name](Walk(oai, endpoint, greedy[endpoint], client, tokenizer))


@pytest.mark.parametrize("endpoint, name", cases("refused"))
def test_refused_field_is_a_400_naming_it(oai, endpoint, name):
    with pytest.raises(openai.BadRequestError, match=name):
        create(oai, endpoint, **{name: REFUSED[name]})


def test_refused_fields_accept_their_harmless_values(oai, greedy):
    harmless = {"tools": [], "functions": [], "tool_choice": "none", "function_call": "auto", "modalities": ["text"]}
    assert texts(create(oai, "chat", **harmless)) == texts(greedy["chat"])


@pytest.mark.parametrize("endpoint, name", cases("ignored"))
def test_ignored_field_changes_nothing(oai, greedy, endpoint, name):
    assert texts(create(oai, endpoint, **{name: IGNORED_VALUES[name]})) == texts(greedy[endpoint])


def test_ignored_stream_option_changes_nothing(oai, greedy):
    for endpoint in ENDPOINTS:
        options = {"include_usage": True, **{name: False for name in ignored("stream_options.")}}
        chunks = list(create(oai, endpoint, stream=True, stream_options=options))
        assert streamed_text(chunks) == text(greedy[endpoint].choices[0]) and chunks[-1].usage == greedy[endpoint].usage
