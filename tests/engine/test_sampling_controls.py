"""What a request may ask of sampling besides temperature: penalties, logit_bias, top logprobs,
prompt logprobs (echo) and n choices that share one prefill. Each inside a mixed batch, against a
reference computed here, with plain rows unchanged."""

import pytest
import torch
from helpers import random_prompts

from prefixserve.engine.request import Request, SamplingParams
from prefixserve.engine.sampler import Sampler, apply_penalties
from prefixserve.errors import InvalidRequestError

GREEDY = dict(temperature=0, ignore_eos=True)


def run(engine, prompts, params_list):
    requests = [engine.add_request(prompt_token_ids=p, params=params) for p, params in zip(prompts, params_list)]
    while engine.has_unfinished():
        engine.step()
    return requests


def test_penalties_match_their_definitions():
    vocab = 12
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    requests = []
    for i, params in enumerate([SamplingParams(presence_penalty=0.5), SamplingParams(frequency_penalty=-0.7),
                                SamplingParams(repetition_penalty=1.8)]):
        r = Request(str(i), [1, 2, 2], params)
        r.token_ids += [4, 4, 5, 2]
        requests.append(r)
    out = apply_penalties(logits.clone(), requests)
    expected = logits.clone()
    for token, count in {4: 2, 5: 1, 2: 1}.items():
        expected[0, token] -= 0.5  # once per distinct output token
        expected[1, token] += 0.7 * count  # per occurrence in the output
    for token in {1, 2, 4, 5}:  # prompt and output, divided when positive, multiplied when negative
        x = logits[2, token]
        expected[2, token] = x / 1.8 if x > 0 else x * 1.8
    assert torch.allclose(out, expected, atol=1e-6)


def test_penalties_touch_only_the_rows_they_are_given():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    first = Request("a", [3], SamplingParams(repetition_penalty=2.0))  # no output yet: the prompt alone counts
    second = Request("b", [1], SamplingParams(frequency_penalty=1.0))
    second.token_ids += [7, 7]
    out = apply_penalties(logits.clone(), [first, second], rows=[2, 0])
    expected = logits.clone()
    x = logits[2, 3]
    expected[2, 3] = x / 2.0 if x > 0 else x * 2.0
    expected[0, 7] -= 2.0
    assert torch.equal(out, expected)


@torch.inference_mode()
def penalized_greedy(hf_model, prompt, num_tokens, presence, frequency, repetition):
    """The reference: transformers' logits, penalties applied by their definitions, argmax."""
    output = []
    for _ in range(num_tokens):
        logits = hf_model(torch.tensor([prompt + output])).logits[0, -1]
        for token in set(prompt + output):
            if token in prompt + output and repetition != 1.0:
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token in set(output):
            logits[token] -= presence + frequency * output.count(token)
        output.append(int(logits.argmax()))
    return output


def test_logit_bias_and_penalties_steer_only_their_rows(make_tiny_engine, tiny_hf):
    prompts = random_prompts([9, 14, 6, 11], seed=11)
    plain = [r.output_token_ids for r in run(make_tiny_engine(), prompts[:1], [SamplingParams(max_new_tokens=24,
                                                                                              **GREEDY)])]
    forced = 77
    steered = run(make_tiny_engine(), prompts, [
        SamplingParams(max_new_tokens=24, **GREEDY),
        SamplingParams(max_new_tokens=24, logit_bias=((forced, 100.0),), **GREEDY),
        SamplingParams(max_new_tokens=24, frequency_penalty=0.8, presence_penalty=0.5, **GREEDY),
        SamplingParams(max_new_tokens=24, repetition_penalty=3.0, **GREEDY),
    ])
    assert steered[0].output_token_ids == plain[0]  # the plain row, batched beside them, is unchanged
    assert steered[1].output_token_ids == [forced] * 24
    assert steered[2].output_token_ids == penalized_greedy(tiny_hf, prompts[2], 24, 0.5, 0.8, 1.0)
    assert steered[3].output_token_ids == penalized_greedy(tiny_hf, prompts[3], 24, 0.0, 0.0, 3.0)
    unpenalized = run(make_tiny_engine(), prompts[2:], [SamplingParams(max_new_tokens=24, **GREEDY)] * 2)
    assert [r.output_token_ids for r in unpenalized] != [r.output_token_ids for r in steered[2:]]


def test_top_logprobs_and_prompt_logprobs_match_transformers(make_tiny_engine, tiny_hf):
    prompt = random_prompts([40], seed=12)[0]
    # 16-token chunks: the prompt's logprobs are assembled over three prefill steps
    engine = make_tiny_engine(max_num_batched_tokens=16)
    [request] = run(engine, [prompt], [SamplingParams(max_new_tokens=4, logprobs=True, top_logprobs=5,
                                                      prompt_logprobs=3, **GREEDY)])
    with torch.inference_mode():
        log_probs = torch.log_softmax(tiny_hf(torch.tensor([prompt + request.output_token_ids])).logits[0], -1)
    n = len(prompt)
    expected_prompt = log_probs[:n - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(request.prompt_logprobs), expected_prompt, atol=1e-4)
    top_ids = torch.topk(log_probs[:n - 1], 3).indices.tolist()
    assert [[t for t, _ in position] for position in request.prompt_top_logprobs] == top_ids
    out_top = torch.topk(log_probs[n - 1:-1], 5)
    assert [[t for t, _ in position] for position in request.top_logprobs] == out_top.indices.tolist()
    assert torch.allclose(torch.tensor([[lp for _, lp in p] for p in request.top_logprobs]), out_top.values, atol=1e-4)
    # greedy: the chosen token is the most likely one
    assert [p[0][0] for p in request.top_logprobs] == request.output_token_ids


def test_prompt_logprobs_survive_preemption(make_tiny_engine):
    prompts = random_prompts([30, 30, 30], seed=13)
    params = SamplingParams(max_new_tokens=24, prompt_logprobs=0, **GREEDY)
    alone = run(make_tiny_engine(), prompts[:1], [params])[0]
    # 8 pages of 16 tokens for three requests of 54 tokens: someone is preempted and recomputed
    engine = make_tiny_engine(num_pages=8)
    crowded = run(engine, prompts, [params] * 3)
    assert engine.scheduler.num_unfinished == 0
    assert len(crowded[0].prompt_logprobs) == 29
    assert torch.allclose(torch.tensor(crowded[0].prompt_logprobs), torch.tensor(alone.prompt_logprobs), atol=1e-5)
    assert crowded[0].output_token_ids == alone.output_token_ids


class CountingRunner:
    """Counts the tokens each forward computes (to show choices share one prefill)."""

    def __init__(self, engine):
        self.tokens = 0
        execute = engine.runner.execute

        def counted(step):
            self.tokens += step.num_batched_tokens
            return execute(step)
        engine.runner.execute = counted


@pytest.mark.parametrize("prompt_len", [16, 21])  # a full last page (shared), a partial one (copied)
def test_choices_share_one_prefill_and_sample_as_their_own_seeds(make_tiny_engine, prompt_len):
    prompt = random_prompts([prompt_len], seed=14)[0]
    sampled = dict(temperature=1.0, ignore_eos=True, max_new_tokens=10)
    engine = make_tiny_engine()
    counter = CountingRunner(engine)
    group = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(n=3, seed=5, **sampled))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert counter.tokens == prompt_len + 3 * 9  # the prompt once, then each choice's own decode steps
    by_index = {}
    for out in outputs:
        assert out.request_id == group.request_id
        by_index.setdefault(out.index, []).extend(out.new_token_ids)
    assert sorted(by_index) == [0, 1, 2]
    assert outputs[-1].finished and sum(o.finished for o in outputs) == 1
    # choice i draws with seed + i: the same tokens as a lone request with that seed
    for index, tokens in by_index.items():
        alone = run(make_tiny_engine(), [prompt], [SamplingParams(seed=5 + index, **sampled)])[0]
        assert tokens == alone.output_token_ids
    assert len({tuple(t) for t in by_index.values()}) == 3
    assert engine.pages.num_free_pages == engine.pages.num_pages and not engine.groups


def test_greedy_choices_match_a_lone_request_under_preemption(make_tiny_engine):
    prompts = random_prompts([21, 30], seed=15)
    params = SamplingParams(max_new_tokens=30, **GREEDY)
    alone = run(make_tiny_engine(), prompts[:1], [params])[0].output_token_ids
    engine = make_tiny_engine(num_pages=9)  # 3 choices + another request of ~60 tokens: preemption
    group = engine.add_request(prompt_token_ids=prompts[0], params=SamplingParams(n=3, max_new_tokens=30, **GREEDY))
    engine.add_request(prompt_token_ids=prompts[1], params=params)
    by_index = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == group.request_id:
                by_index.setdefault(out.index, []).extend(out.new_token_ids)
    assert by_index == {0: alone, 1: alone, 2: alone}
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_aborting_a_request_ends_every_choice(make_tiny_engine):
    prompt = random_prompts([20], seed=16)[0]
    engine = make_tiny_engine()
    group = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(n=4, max_new_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert len(engine.requests) == 4
    out = engine.abort(group.request_id)
    assert out.finished and out.finish_reason == "abort"
    assert not engine.requests and not engine.groups and not engine.has_unfinished()
    assert engine.pages.num_free_pages == engine.pages.num_pages
    assert engine.scheduler.num_unfinished == 0


@pytest.mark.parametrize("params, message", [
    (dict(n=0), "n must be"), (dict(n=17), "n must be"), (dict(top_logprobs=21), "top_logprobs"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias=((5, 101.0),)), "logit_bias"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_bad_controls_are_refused(params, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**params)


def test_logit_bias_token_outside_the_vocabulary_is_refused(make_tiny_engine):
    engine = make_tiny_engine()
    vocab = engine.backbone.arch.vocab_size
    with pytest.raises(InvalidRequestError, match=f"in \\[0, {vocab}\\)"):
        engine.make_request(prompt_token_ids=[1, 2], params=SamplingParams(logit_bias=((vocab, 1.0),)))


def test_rows_without_controls_pass_through_untouched():
    """Plain rows' logits reach the argmax as they are: no stage copies or rewrites them."""
    logits = torch.randn(4, 50)
    requests = [Request(str(i), [1], SamplingParams(temperature=0)) for i in range(4)]
    sampler = Sampler(frozenset())
    assert sampler._mask_min_tokens(logits, requests, copied=False) is logits
    assert sampler._apply_bias_and_penalties(logits, requests, copied=False) is logits
    result = sampler(logits, requests)
    assert result.tokens == logits.argmax(-1).tolist() and result.logprobs is None and result.top_logprobs is None
