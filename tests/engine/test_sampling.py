"""Sampling per request inside a mixed batch: seeds, top-k/top-p, stop conditions, logprobs."""

import pytest
import torch
from helpers import random_prompts

from prefixserve.engine.request import RequestStatus, SamplingParams
from prefixserve.errors import InvalidRequestError


def sample_alone(engine_factory, prompt, params):
    return engine_factory().generate([prompt], params)[0].token_ids


def test_seed_reproduces_tokens_alone_and_in_a_mixed_batch(make_tiny_engine):
    prompt = random_prompts([9], seed=3)[0]
    seeded = SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.9, seed=1234, ignore_eos=True)
    alone = sample_alone(make_tiny_engine, prompt, seeded)
    engine = make_tiny_engine()
    others = [engine.add_request(prompt_token_ids=p, params=SamplingParams(max_new_tokens=20, temperature=1.0,
                                                                           ignore_eos=True))
              for p in random_prompts([4, 30, 12], seed=4)]
    engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_new_tokens=8, temperature=0))
    engine.step()
    mixed = engine.add_request(prompt_token_ids=prompt, params=seeded)
    while engine.has_unfinished():
        engine.step()
    assert mixed.output_token_ids == alone
    other_seed = sample_alone(make_tiny_engine, prompt, SamplingParams(
        max_new_tokens=16, temperature=1.3, top_p=0.9, seed=99, ignore_eos=True))
    assert other_seed != alone
    assert all(o.num_output_tokens == 20 for o in others)


def test_top_k_one_is_greedy(make_tiny_engine):
    prompt = random_prompts([11], seed=5)[0]
    greedy = sample_alone(make_tiny_engine, prompt, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    top1 = sample_alone(make_tiny_engine, prompt, SamplingParams(max_new_tokens=10, temperature=5.0, top_k=1,
                                                                 ignore_eos=True))
    assert top1 == greedy


def test_top_k_and_top_p_only_draw_allowed_tokens(tiny_backbone):
    from prefixserve.engine.request import Request
    from prefixserve.engine.sampler import Sampler

    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(200, 1)
    sampler = Sampler(frozenset())
    top_k = [Request(str(i), [1], SamplingParams(temperature=1.0, top_k=2, seed=i)) for i in range(200)]
    assert set(sampler(logits, top_k)[0]) == {0, 1}
    # softmax of the first three is ~[0.66, 0.24, 0.09]: top_p 0.8 keeps tokens 0 and 1 only
    top_p = [Request(str(i), [1], SamplingParams(temperature=1.0, top_p=0.8, seed=i)) for i in range(200)]
    assert set(sampler(logits, top_p)[0]) == {0, 1}


def test_stop_token_ids_and_eos(make_tiny_engine):
    prompt = random_prompts([6], seed=6)[0]
    free = sample_alone(make_tiny_engine, prompt, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    stop_at = free[4]
    out = make_tiny_engine().generate([prompt], SamplingParams(max_new_tokens=10, temperature=0,
                                                                stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == free[:free.index(stop_at) + 1] and out.finish_reason == "stop"
    # min_tokens masks the stop token until enough tokens exist
    late = make_tiny_engine().generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, min_tokens=10,
                                                                 stop_token_ids=(stop_at,)))[0]
    assert len(late.token_ids) == 10 and stop_at not in late.token_ids


def test_logprobs_are_those_of_the_chosen_tokens(make_tiny_engine, tiny_hf):
    prompt = random_prompts([8], seed=7)[0]
    out = make_tiny_engine().generate([prompt], SamplingParams(max_new_tokens=5, temperature=0, logprobs=True,
                                                                ignore_eos=True))[0]
    with torch.inference_mode():
        logits = tiny_hf(torch.tensor([prompt + out.token_ids])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(out.token_ids)[:, None])
    assert torch.allclose(torch.tensor(out.logprobs), expected[:, 0], atol=1e-4)


def test_extreme_sampling_values_neither_fail_nor_stop_the_engine(make_tiny_engine):
    """Found by schemathesis: each of these used to raise inside step() and kill the engine loop."""
    prompt = random_prompts([7], seed=8)[0]
    greedy = sample_alone(make_tiny_engine, prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    tiny_temperature = SamplingParams(max_new_tokens=6, temperature=1e-39, ignore_eos=True)
    assert sample_alone(make_tiny_engine, prompt, tiny_temperature) == greedy  # below 1e-5 is greedy
    tiny_top_p = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-300, ignore_eos=True, seed=1)
    assert sample_alone(make_tiny_engine, prompt, tiny_top_p) == greedy  # only the top token survives


def test_stop_token_ids_outside_the_vocabulary_are_a_400(make_tiny_engine):
    engine = make_tiny_engine()
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids must be in \[0, 512\), found 1000000"):
        engine.make_request(prompt_token_ids=[1, 2], params=SamplingParams(stop_token_ids=(1000000,), min_tokens=2))


def test_a_request_whose_sampling_fails_ends_alone_and_the_rest_go_on(make_tiny_engine, monkeypatch):
    engine = make_tiny_engine()
    sample_row = engine.sampler._sample_row

    def fail_for_seed_13(row, request):  # fault injection: a sampling error nobody foresaw
        if request.params.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample_row(row, request)

    monkeypatch.setattr(engine.sampler, "_sample_row", fail_for_seed_13)
    params = dict(max_new_tokens=5, temperature=1.0, ignore_eos=True)
    bad = engine.add_request(prompt_token_ids=[3, 4, 5], params=SamplingParams(seed=13, **params))
    good = [engine.add_request(prompt_token_ids=[3, 4, 5], params=SamplingParams(seed=s, **params)) for s in (1, 2)]
    errors = []
    while engine.has_unfinished():
        errors += [o.error for o in engine.step() if o.error is not None]
    assert bad.status == RequestStatus.FINISHED_ERROR and len(errors) == 1
    assert "could not be applied" in errors[0].message and errors[0].status_code == 400
    assert all(r.num_output_tokens == 5 for r in good)
    assert engine.pages.num_free_pages == engine.pages.num_pages
