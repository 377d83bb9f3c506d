"""Our engine vs transformers on the tiny random Llama: logits and greedy tokens, one at a time and
in one continuous batch with staggered arrivals, chunked prefill and preemption."""

import pytest
import torch
from helpers import capture_logits, hf_greedy, max_rel_error, random_prompts

from prefixserve.engine.request import SamplingParams
from prefixserve.errors import InvalidRequestError

LENGTHS = [1, 5, 16, 17, 33, 60, 7, 100]  # below, at and across page boundaries (page 16)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def run_staggered(engine, prompts, params, arrivals):
    """Add prompt i at step arrivals[i]; step until all finish. Returns requests in prompt order."""
    requests, step = [None] * len(prompts), 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                requests[i] = engine.add_request(prompt_token_ids=prompts[i], params=params)
        engine.step()
        step += 1
        if step > 10_000:
            raise RuntimeError("engine did not finish")
    return requests


@pytest.fixture(scope="module")
def reference(tiny_hf):
    prompts = random_prompts(LENGTHS)
    return prompts, [hf_greedy(tiny_hf, p, GREEDY.max_new_tokens) for p in prompts]


def test_one_at_a_time_matches_transformers(make_tiny_engine, reference):
    prompts, expected = reference
    engine = make_tiny_engine()
    for prompt, tokens in zip(prompts, expected):
        assert engine.generate([prompt], GREEDY)[0].token_ids == tokens


def test_continuous_batch_with_staggered_arrivals_matches(make_tiny_engine, reference, tiny_hf):
    prompts, expected = reference
    engine = make_tiny_engine()
    seen = capture_logits(engine)
    requests = run_staggered(engine, prompts, GREEDY, arrivals=[0, 0, 1, 3, 3, 4, 9, 10])
    assert [r.output_token_ids for r in requests] == expected
    with torch.inference_mode():
        worst = max(max_rel_error(row, tiny_hf(torch.tensor([prefix])).logits[0, -1]) for _, prefix, row in seen)
    assert len(seen) == len(prompts) * GREEDY.max_new_tokens
    assert worst < 1e-4
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_chunked_prefill_matches(make_tiny_engine, reference):
    prompts, expected = reference
    engine = make_tiny_engine(max_num_seqs=4, max_num_batched_tokens=24)  # the 100-token prompt takes 5 chunks
    requests = run_staggered(engine, prompts, GREEDY, arrivals=[0, 0, 0, 1, 2, 2, 3, 5])
    assert [r.output_token_ids for r in requests] == expected


def test_preemption_under_tiny_pool_keeps_tokens(make_tiny_engine, reference):
    prompts, expected = reference
    engine = make_tiny_engine(num_pages=12)  # 192 token slots for ~330 tokens of demand
    preempted = []
    schedule = engine.scheduler.schedule

    def counting():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = counting
    requests = run_staggered(engine, prompts, GREEDY, arrivals=[0] * len(prompts))
    assert preempted, "the pool was meant to run out and force preemption"
    assert [r.output_token_ids for r in requests] == expected
    assert engine.pages.num_free_pages == engine.pages.num_pages


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_token_ids=[]), "prompt is empty"),
    (dict(prompt_token_ids=[5] * 256), "context holds 256"),
    (dict(prompt_token_ids=[600]), "token ids must be integers in [0, 512)"),
])
def test_bad_prompt_is_refused_and_others_keep_running(make_tiny_engine, kwargs, message):
    engine = make_tiny_engine()
    good = engine.add_request(prompt_token_ids=[5, 6, 7], params=GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(params=GREEDY, **kwargs)
    assert message in str(err.value)
    while engine.has_unfinished():
        engine.step()
    assert good.num_output_tokens == GREEDY.max_new_tokens
    assert engine.pages.num_free_pages == engine.pages.num_pages


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, found 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer, found -3"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, found nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, found inf"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(min_tokens=5, max_new_tokens=2), "min_tokens must be in [0, max_new_tokens=2]"),
])
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_request_larger_than_pool_is_refused(make_tiny_engine):
    engine = make_tiny_engine(num_pages=2)
    with pytest.raises(InvalidRequestError, match="more than the whole pool"):
        engine.add_request(prompt_token_ids=[5] * 20, params=SamplingParams(max_new_tokens=20))
    assert not engine.has_unfinished()


def test_generation_stops_at_context_length(make_tiny_engine):
    engine = make_tiny_engine()
    out = engine.generate([[5] * 250], SamplingParams(max_new_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    # Asking for more than the context leaves is refused with both numbers, not silently clamped (as vLLM).
    with pytest.raises(InvalidRequestError, match=r"too large: 100\. .* at most 6 new tokens \(100 > 256 - 250\)"):
        engine.generate([[5] * 250], SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True))
