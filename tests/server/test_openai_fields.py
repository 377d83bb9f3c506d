"""The OpenAI fields beyond plain sampling (n, batched prompts, best-of, echo, logprobs, penalties,
logit_bias, structured outputs) through the unmodified `openai` client over real HTTP with SmolLM2:
streamed and not, on the plain backbone and on a LoRA task, alone and in one mixed load with plain
requests, whose greedy text must not change with their batch neighbours; forked choices leave no
pages behind and leave with the client."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from http_server import serving

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig

pytestmark = pytest.mark.slow

TASK = "fields-lora"
MODELS = ["base", TASK]
PROMPT = "The capital of France is"
OPEN_PROMPT = "My favourite colour is"  # many likely continuations: sampled choices differ
CAT = [{"role": "user", "content": "Repeat the word cat."}]  # greedy repeats itself within 5 tokens
GREEDY = {"temperature": 0, "max_tokens": 6}
SAMPLED = {"temperature": 1.0, "max_tokens": 5}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
PERSON_PROMPT = [{"role": "user", "content": "Give me a JSON object with the name and age of a person."}]


def lora_artifact(sync, seed: int = 1, scale: float = 0.1) -> bytes:
    """A rank-4 LoRA on q_proj and v_proj of every layer with small random weights: its greedy text
    differs from the backbone's and is still English."""
    arch, rank = sync.backbone.arch, 4
    g = torch.Generator().manual_seed(seed)
    out_features = {"q_proj": arch.num_heads * arch.head_dim, "v_proj": arch.num_kv_heads * arch.head_dim}
    tensors = {}
    for layer in range(arch.num_layers):
        for target, fan_out in out_features.items():
            tensors[f"layers.{layer}.{target}.lora_a"] = torch.randn(rank, arch.hidden_size, generator=g) * scale
            tensors[f"layers.{layer}.{target}.lora_b"] = torch.randn(fan_out, rank, generator=g) * scale
    config = {"rank": rank, "alpha": 8.0, "use_rslora": False, "targets": sorted(out_features)}
    return encode_artifact("lora", config, tensors, sync.adapters.fingerprint)


@pytest.fixture(scope="module")
def server(smollm2):
    # Room for the mixed load: a dozen requests at once, some with several choices.
    config = EngineConfig(cache=CacheConfig(num_pages=256), scheduler=SchedulerConfig(max_num_seqs=16, max_waiting=64),
                          adapters=AdapterLimits(max_artifact_bytes=8 << 20))
    with serving(smollm2, config) as running:
        with httpx.Client(base_url=running[0], timeout=60) as c:
            resp = c.put(f"/v1/tasks/{TASK}", files={"file": ("lora.bin", lora_artifact(running[1]),
                                                              "application/octet-stream")})
            assert resp.status_code == 201, resp.text
        yield running


# ---- one request's answer, streamed or not, in one shape ---------------------------------------
@dataclass
class Answer:
    """What a request answered, per choice index, whether it streamed or not."""

    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)  # with logprobs
    logprobs: dict[int, list[float | None]] = field(default_factory=dict)
    top: dict[int, list] = field(default_factory=dict)  # completions: dicts; chat: lists of TopLogprob
    usage: object | None = None
    num_chunks: int = 0

    def add_logprobs(self, index: int, logprobs) -> None:
        if logprobs is None:
            return
        if hasattr(logprobs, "content"):  # chat
            entries = logprobs.content or []
            tokens, values, top = [e.token for e in entries], [e.logprob for e in entries], \
                [e.top_logprobs for e in entries]
        else:
            tokens, values, top = logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs
        self.tokens.setdefault(index, []).extend(tokens)
        self.logprobs.setdefault(index, []).extend(values)
        self.top.setdefault(index, []).extend(top)

    @property
    def choice_texts(self) -> list[str]:
        return [self.texts[i] for i in sorted(self.texts)]


def ask(oai, endpoint: str, *, stream: bool = False, **kwargs) -> Answer:
    """One request through the client, as an Answer. A stream must say each choice's finish once,
    in its own chunk, and send no text for it afterwards."""
    create = oai.completions.create if endpoint == "completions" else oai.chat.completions.create
    answer = Answer()
    if not stream:
        resp = create(**kwargs)
        for c in resp.choices:
            answer.texts[c.index] = c.text if endpoint == "completions" else c.message.content
            answer.finish_reasons[c.index] = c.finish_reason
            answer.add_logprobs(c.index, c.logprobs)
        answer.usage = resp.usage
        return answer
    for chunk in create(stream=True, **kwargs):
        answer.num_chunks += 1
        if chunk.usage is not None:
            answer.usage = chunk.usage
        assert len(chunk.choices) <= 1, chunk
        for c in chunk.choices:
            assert c.index not in answer.finish_reasons, f"choice {c.index} streamed after its finish: {chunk}"
            text = c.text if endpoint == "completions" else (c.delta.content or "")
            answer.texts[c.index] = answer.texts.get(c.index, "") + text
            if c.finish_reason is not None:
                answer.finish_reasons[c.index] = c.finish_reason
            answer.add_logprobs(c.index, c.logprobs)
    assert set(answer.finish_reasons) == set(answer.texts), "every streamed choice says how it finished"
    return answer


def assert_same_answer(streamed: Answer, whole: Answer) -> None:
    assert streamed.texts == whole.texts
    assert streamed.finish_reasons == whole.finish_reasons
    assert streamed.tokens == whole.tokens
    for index, values in whole.logprobs.items():
        assert streamed.logprobs[index] == pytest.approx(values, abs=1e-4)


# ---- n: choices after one prefill ---------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy(oai) -> dict[str, Answer]:
    """Each model's single greedy answer to PROMPT (with logprobs, to count its tokens)."""
    answers = {model: ask(oai, "completions", model=model, prompt=PROMPT, logprobs=0, **GREEDY) for model in MODELS}
    assert answers["base"].texts != answers[TASK].texts, "the task must answer differently from the backbone"
    return answers


@pytest.mark.parametrize("model", MODELS)
def test_greedy_choices_all_equal_the_single_answer(oai, greedy, model):
    single = greedy[model]
    three = ask(oai, "completions", model=model, prompt=PROMPT, n=3, logprobs=0, **GREEDY)
    assert three.texts == {i: single.texts[0] for i in range(3)}
    assert three.finish_reasons == {i: single.finish_reasons[0] for i in range(3)}
    # Prompt tokens once (the choices share them), every choice's completion tokens.
    assert three.usage.prompt_tokens == single.usage.prompt_tokens
    assert three.usage.completion_tokens == sum(len(t) for t in three.tokens.values()) \
        == 3 * single.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_seeded_choices_are_reproducible_distinct_and_stream_alike(oai, model):
    args = {"model": model, "prompt": OPEN_PROMPT, "n": 3, "seed": 7, "logprobs": 0, **SAMPLED}
    first, again = ask(oai, "completions", **args), ask(oai, "completions", **args)
    assert first.texts == again.texts and sorted(first.texts) == [0, 1, 2]
    assert len(set(first.choice_texts)) == 3, first.texts
    assert first.usage.completion_tokens == sum(len(t) for t in first.tokens.values())
    streamed = ask(oai, "completions", stream=True, stream_options={"include_usage": True}, **args)
    assert_same_answer(streamed, first)
    assert streamed.usage == first.usage
    # Choice i samples with seed + i: choice 1 is what seed 8 alone samples.
    alone = ask(oai, "completions", **{**args, "n": 1, "seed": 8})
    assert alone.texts[0] == first.texts[1]


def test_chat_choices_stream_each_with_its_role_and_usage_in_every_chunk(oai):
    args = {"model": TASK, "messages": CAT, "n": 2, "seed": 3, **SAMPLED}
    whole = ask(oai, "chat", **args)
    assert sorted(whole.texts) == [0, 1] and whole.texts[0] != whole.texts[1]
    chunks = list(oai.chat.completions.create(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}, **args))
    firsts = {}
    for chunk in chunks[:-1]:
        (c,) = chunk.choices
        firsts.setdefault(c.index, c.delta.role)
        assert chunk.usage is not None  # continuous_usage_stats: usage in every chunk
    assert firsts == {0: "assistant", 1: "assistant"}
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == whole.texts


@pytest.mark.parametrize("model", MODELS)
def test_batched_prompts_answer_prompt_major_like_single_prompts(oai, tokenizer, model):
    args = {"model": model, "n": 2, "seed": 5, **SAMPLED, "max_tokens": 4}
    batch = ask(oai, "completions", prompt=[PROMPT, OPEN_PROMPT], **args)
    singles = [ask(oai, "completions", prompt=p, **args) for p in (PROMPT, OPEN_PROMPT)]
    assert batch.texts == {0: singles[0].texts[0], 1: singles[0].texts[1],
                           2: singles[1].texts[0], 3: singles[1].texts[1]}
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    as_ids = ask(oai, "completions", prompt=[tokenizer(p).input_ids for p in (PROMPT, OPEN_PROMPT)], **args)
    assert as_ids.texts == batch.texts


def test_best_of_returns_the_choice_with_the_highest_mean_logprob(oai):
    args = {"model": "base", "prompt": OPEN_PROMPT, "seed": 3, **SAMPLED, "max_tokens": 4}
    candidates = ask(oai, "completions", n=3, logprobs=0, **args)  # the same three best_of draws
    means = {i: sum(lp) / len(lp) for i, lp in candidates.logprobs.items()}
    best = ask(oai, "completions", best_of=3, **args)
    assert best.choice_texts == [candidates.texts[max(means, key=means.get)]]


# ---- echo and logprobs --------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_echo_with_logprobs_scores_the_prompt_as_generation_would(oai, tokenizer, model):
    num_prompt_tokens = len(tokenizer(PROMPT).input_ids)
    plain = ask(oai, "completions", model=model, prompt=PROMPT, temperature=0, max_tokens=1, logprobs=1)
    first = plain.texts[0]
    echoed = ask(oai, "completions", model=model, prompt=PROMPT, temperature=0, max_tokens=2, logprobs=1, echo=True)
    text, tokens, logprobs = echoed.texts[0], echoed.tokens[0], echoed.logprobs[0]
    assert text.startswith(PROMPT + first) and "".join(tokens) == text
    assert len(tokens) == num_prompt_tokens + 2 and echoed.usage.prompt_tokens == num_prompt_tokens
    assert logprobs[0] is None and echoed.top[0][0] is None  # nothing predicts the first prompt token
    assert all(lp is not None and lp <= 0 for lp in logprobs[1:])
    assert logprobs[num_prompt_tokens] == pytest.approx(plain.logprobs[0][0], abs=1e-4)
    # The reference for the prompt's logprobs: a prompt one token longer scores that token as
    # generating it did, and agrees on the positions before it.
    longer = ask(oai, "completions", model=model, prompt=PROMPT + first, temperature=0, max_tokens=1, logprobs=1,
                 echo=True)
    assert longer.tokens[0][:num_prompt_tokens + 1] == tokens[:num_prompt_tokens + 1]
    assert longer.logprobs[0][:num_prompt_tokens + 1] == pytest.approx(logprobs[:num_prompt_tokens + 1], abs=1e-4)
    assert first in longer.top[0][num_prompt_tokens]

    streamed = ask(oai, "completions", stream=True, model=model, prompt=PROMPT, temperature=0, max_tokens=2,
                   logprobs=1, echo=True)
    assert_same_answer(streamed, echoed)
    chunks = oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=2, echo=True, stream=True)
    assert next(iter(chunks)).choices[0].text.startswith(PROMPT)
    chunks.close()


def test_echo_repeats_each_prompt_for_each_of_its_choices(oai):
    answer = ask(oai, "completions", model="base", prompt=[PROMPT, OPEN_PROMPT], n=2, echo=True, logprobs=0,
                 temperature=0, max_tokens=2)
    assert sorted(answer.texts) == [0, 1, 2, 3]
    for index, text in answer.texts.items():
        assert text.startswith([PROMPT, OPEN_PROMPT][index // 2]) and answer.logprobs[index][0] is None


@pytest.mark.parametrize("model", MODELS)
def test_top_logprobs_hold_k_alternatives_and_the_chosen_token(oai, model):
    k = 3
    completion = ask(oai, "completions", model=model, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=k)
    assert len(completion.tokens[0]) == completion.usage.completion_tokens == 4
    for token, logprob, top in zip(completion.tokens[0], completion.logprobs[0], completion.top[0]):
        assert len(top) in (k, k + 1) and top[token] == logprob
        assert logprob == max(top.values())  # greedy: the chosen token is the most likely

    args = {"model": model, "messages": CAT, "temperature": 0, "max_tokens": 4, "logprobs": True, "top_logprobs": k}
    chat = ask(oai, "chat", **args)
    assert "".join(chat.tokens[0]) == chat.texts[0] and len(chat.tokens[0]) == chat.usage.completion_tokens
    for token, logprob, top in zip(chat.tokens[0], chat.logprobs[0], chat.top[0]):
        assert len(top) == k
        assert all(t.bytes == list(t.token.encode()) for t in top)
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token == token and top[0].logprob == pytest.approx(logprob, abs=1e-5)
    assert_same_answer(ask(oai, "chat", stream=True, **args), chat)


# ---- penalties and logit_bias -------------------------------------------------------------------
REPEATING_COMPLETION = {"model": "base", "prompt": "Repeat after me: hello hello hello hello", **GREEDY}
REPEATING_CHAT = {"model": "base", "messages": CAT, **GREEDY}


@pytest.fixture(scope="module")
def unpenalized(oai) -> dict[str, Answer]:
    return {"completions": ask(oai, "completions", **REPEATING_COMPLETION), "chat": ask(oai, "chat", **REPEATING_CHAT)}


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"extra_body": {"repetition_penalty": 1.5}}], ids=lambda p: str(p)[:20])
def test_penalties_change_greedy_text_streamed_or_not(oai, unpenalized, penalty):
    penalized = ask(oai, "completions", **REPEATING_COMPLETION, **penalty)
    assert penalized.texts != unpenalized["completions"].texts
    assert_same_answer(ask(oai, "completions", stream=True, **REPEATING_COMPLETION, **penalty), penalized)
    assert ask(oai, "chat", **REPEATING_CHAT, **penalty).texts != unpenalized["chat"].texts


@pytest.mark.parametrize("model", MODELS)
def test_logit_bias_forces_or_bans_a_token_streamed_or_not(oai, client, tokenizer, model):
    (cat,) = tokenizer(" cat").input_ids
    forced = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 4, "logprobs": 0,
              "logit_bias": {str(cat): 100}}
    answer = ask(oai, "completions", **forced)
    assert answer.tokens[0] == [" cat"] * 4 and answer.texts[0] == " cat" * 4
    assert_same_answer(ask(oai, "completions", stream=True, **forced), answer)
    chat = ask(oai, "chat", model=model, messages=CAT, temperature=0, max_tokens=3, logit_bias={str(cat): 100})
    assert chat.texts[0] == " cat" * 3

    native = client.post("/v1/generate", json={"prompt": PROMPT, "task": model, "temperature": 0,
                                                "max_new_tokens": 2}).json()
    greedy_first = native["token_ids"][0]
    banned = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 2, "logprobs": 0,
              "logit_bias": {str(greedy_first): -1000}}  # clamped to -100, as OpenAI does
    answer = ask(oai, "completions", **banned)
    assert answer.tokens[0][0] != tokenizer.decode([greedy_first])
    assert_same_answer(ask(oai, "completions", stream=True, **banned), answer)


# ---- structured outputs -------------------------------------------------------------------------
def is_person(text: str) -> bool:
    person = json.loads(text)
    return set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 12 \
        and type(person["age"]) is int and 0 <= person["age"] <= 120


STRUCTURED = {  # name -> (endpoint, request fields, what the text must be)
    "json_schema": ("chat", {"messages": PERSON_PROMPT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}, is_person),
    "json_object": ("chat", {"messages": [{"role": "user", "content": 'Return {"ok": true} as JSON.'}],
                             "response_format": {"type": "json_object"}},
                    lambda text: isinstance(json.loads(text), dict)),
    "guided_json": ("completions", {"prompt": "The person, as JSON:", "extra_body": {"guided_json": PERSON}},
                    is_person),
    "guided_choice": ("completions", {"prompt": "Is the sky blue? Answer:",
                                      "extra_body": {"guided_choice": ["yes", "no", "maybe"]}},
                      lambda text: text in ("yes", "no", "maybe")),
    "guided_regex": ("completions", {"prompt": "Call me at", "extra_body": {"guided_regex": r" [0-9]{3}-[0-9]{4}"}},
                     lambda text: re.fullmatch(r" [0-9]{3}-[0-9]{4}", text) is not None),
    "guided_grammar": ("completions", {"prompt": "Pick a seat:", "extra_body": {
        "guided_grammar": 'start: ROW " " SEAT\nROW: /[A-F]/\nSEAT: /[1-9][0-9]?/'}},
                       lambda text: re.fullmatch(r"[A-F] [1-9][0-9]?", text) is not None),
}


@pytest.mark.parametrize("name, model, stream", [
    ("json_schema", "base", False), ("json_schema", TASK, True),
    ("json_object", "base", True), ("json_object", TASK, False),
    ("guided_json", "base", True), ("guided_json", TASK, False),
    ("guided_choice", "base", False), ("guided_choice", TASK, True),
    ("guided_regex", "base", True), ("guided_regex", TASK, False),
    ("guided_grammar", "base", False), ("guided_grammar", TASK, True),
])
def test_structured_output_matches_its_format(oai, name, model, stream):
    endpoint, fields, matches = STRUCTURED[name]
    answer = ask(oai, endpoint, stream=stream, model=model, temperature=0, max_tokens=40, **fields)
    assert answer.finish_reasons == {0: "stop"}, answer  # the format ended, not max_tokens
    assert matches(answer.texts[0]), answer.texts[0]


def test_json_schema_keys_come_in_the_schemas_order(oai):
    """OpenAI's structured outputs write an object's keys in the order the schema lists them."""
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = ask(oai, "chat", model="base", messages=PERSON_PROMPT, temperature=0, max_tokens=40,
                 response_format=response_format)
    assert list(json.loads(answer.texts[0])) == list(PERSON["properties"]), answer.texts[0]


# ---- the mixed load -----------------------------------------------------------------------------
def plain_requests() -> dict[str, tuple[str, dict]]:
    """Greedy requests that use none of the new fields: name -> (endpoint, fields)."""
    completion = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    chat = {"messages": CAT, "max_tokens": 6, "temperature": 0}
    return {
        "completion-base": ("completions", {"model": "base", **completion}),
        "completion-task": ("completions", {"model": TASK, **completion}),
        "completion-base-stream": ("completions", {"model": "base", "stream": True, **completion,
                                                   "prompt": OPEN_PROMPT}),
        "chat-base": ("chat", {"model": "base", **chat}),
        "chat-task": ("chat", {"model": TASK, **chat}),
        "chat-task-stream": ("chat", {"model": TASK, "stream": True, **chat, "messages": PERSON_PROMPT}),
    }


def special_requests(cat: int) -> dict[str, tuple[str, dict, object]]:
    """Requests that use the new fields: name -> (endpoint, fields, the property their Answer must have)."""
    def distinct_choices(a: Answer) -> bool:
        return sorted(a.texts) == [0, 1, 2] and len(set(a.choice_texts)) == 3

    def echoed(a: Answer) -> bool:
        return a.texts[0].startswith(PROMPT) and a.logprobs[0][0] is None and "".join(a.tokens[0]) == a.texts[0]

    def ranked_alternatives(a: Answer) -> bool:
        return all(len(top) == 3 and top[0].token == token for token, top in zip(a.tokens[0], a.top[0]))

    def choices_in_set(a: Answer) -> bool:
        return sorted(a.texts) == [0, 1] and all(t in ("yes", "no", "maybe") for t in a.choice_texts)

    return {
        "n3-seeded-task": ("completions", {"model": TASK, "prompt": OPEN_PROMPT, "n": 3, "seed": 11, **SAMPLED},
                           distinct_choices),
        "presence-chat": ("chat", {"model": "base", "messages": CAT, "max_tokens": 8, "temperature": 0,
                                   "presence_penalty": 2.0}, lambda a: bool(a.texts[0])),
        "logit-bias-task-stream": ("completions", {"model": TASK, "prompt": PROMPT, "max_tokens": 4,
                                                   "temperature": 0, "stream": True, "logit_bias": {str(cat): 100}},
                                   lambda a: a.texts[0] == " cat" * 4),
        "json-schema-task": ("chat", {"model": TASK, "messages": PERSON_PROMPT, "max_tokens": 40, "temperature": 0,
                                      "response_format": {"type": "json_schema", "json_schema": {
                                          "name": "person", "schema": PERSON, "strict": True}}},
                             lambda a: a.finish_reasons[0] == "stop" and is_person(a.texts[0])),
        "echo-logprobs-base": ("completions", {"model": "base", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                               "echo": True, "logprobs": 2}, echoed),
        "top-logprobs-chat-stream": ("chat", {"model": "base", "messages": CAT, "max_tokens": 6, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 3, "stream": True},
                                     ranked_alternatives),
        "choice-n2-sampled": ("completions", {"model": "base", "prompt": "Is the sky blue? Answer:", "n": 2,
                                              "seed": 2, "temperature": 1.0, "max_tokens": 8,
                                              "extra_body": {"guided_choice": ["yes", "no", "maybe"]}},
                              choices_in_set),
    }


def uses_no_new_field(params) -> bool:
    return params.n == 1 and not (params.penalized or params.logit_bias or params.structured or params.logprobs
                                  or params.prompt_logprobs is not None or params.seed is not None)


def run(oai, endpoint: str, fields: dict) -> Answer:
    fields = dict(fields)
    return ask(oai, endpoint, stream=fields.pop("stream", False), **fields)


def test_mixed_load_keeps_plain_greedy_text_and_every_fields_effect(oai, server, tokenizer, monkeypatch):
    (cat,) = tokenizer(" cat").input_ids
    plain, special = plain_requests(), special_requests(cat)
    requests = {name: spec[:2] for name, spec in {**plain, **special}.items()}
    alone = {name: run(oai, *spec) for name, spec in requests.items()}

    runner, rows_per_step = server[1].runner, []  # (plain rows, rows using a new field) per step
    execute = runner.execute

    def counting(step):
        result = execute(step)
        plain_rows = sum(uses_no_new_field(r.params) for r in result.sampling_requests)
        rows_per_step.append((plain_rows, len(result.sampling_requests) - plain_rows))
        return result

    monkeypatch.setattr(runner, "execute", counting)
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = {name: pool.submit(run, oai, *spec) for name, spec in requests.items()}
        together = {name: future.result(timeout=120) for name, future in futures.items()}
    monkeypatch.undo()
    # They shared steps: plain rows beside rows with penalties, grammars, biases, logprobs and choices.
    assert max(min(counts) for counts in rows_per_step) >= 4, rows_per_step
    for name in plain:  # greedy text does not depend on the batch around it
        assert together[name].texts == alone[name].texts, name
    for name, (_, _, holds) in special.items():
        assert holds(alone[name]), (name, alone[name])
        assert holds(together[name]), (name, together[name])
        assert together[name].texts == alone[name].texts, name  # greedy or seeded: the same text either way
    assert alone["presence-chat"].texts != alone["chat-base"].texts  # the penalty took effect


# ---- choices leave with the client and leave no pages behind ------------------------------------
def wait_until_idle(sync, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (sync.has_unfinished() or sync.pages.num_free_pages != sync.pages.num_pages) \
            and time.monotonic() < deadline:
        time.sleep(0.05)


def test_leaving_a_stream_of_four_choices_aborts_them_all(oai, server):
    sync = server[1]
    stream = oai.completions.create(model=TASK, prompt="Tell me a long story.", n=4, seed=1, max_tokens=400,
                                    stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    assert sync.has_unfinished()
    stream.close()  # the client leaves after the first chunk
    wait_until_idle(sync)
    assert not sync.has_unfinished()
    assert sync.pages.num_free_pages == sync.pages.num_pages


def test_no_pages_are_left_after_everything(server):
    sync = server[1]
    wait_until_idle(sync)
    assert not sync.has_unfinished()
    assert sync.pages.num_free_pages == sync.pages.num_pages
