"""The embedded backbone (SmolLM2-135M-Instruct) against transformers on the same weights."""

import pytest
import torch
from helpers import capture_logits, hf_greedy, max_rel_error

from prefixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Q: What is 12 plus 30?\nA:",
    "Translate to French: I like apples.",
    "Hi",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Again, the",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    chat = [smollm2.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in PROMPTS[:2]]
    texts = PROMPTS + chat  # chat turns end with <|im_end|>, so EOS handling is exercised too
    return [smollm2.tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@pytest.fixture(scope="module")
def expected(smollm2_hf, smollm2, prompt_ids):
    (eos,) = smollm2.eos_token_ids
    return [hf_greedy(smollm2_hf, ids, MAX_NEW, eos_token_id=eos) for ids in prompt_ids]


def engine(smollm2, **scheduler):
    return LLMEngine(smollm2, EngineConfig(cache=CacheConfig(num_pages=256), scheduler=SchedulerConfig(**scheduler)))


def test_greedy_one_at_a_time_matches_transformers(smollm2, prompt_ids, expected):
    e = engine(smollm2)
    got = [e.generate([ids], SamplingParams(max_new_tokens=MAX_NEW, temperature=0))[0].token_ids for ids in prompt_ids]
    assert got == expected


def test_greedy_in_one_running_batch_matches_transformers(smollm2, smollm2_hf, prompt_ids, expected):
    e = engine(smollm2, max_num_seqs=16, max_num_batched_tokens=64)  # chunked prefill for the long ones
    seen = capture_logits(e)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0)
    requests, step = [], 0
    while len(requests) < len(prompt_ids) or e.has_unfinished():
        if step % 2 == 0 and len(requests) < len(prompt_ids):  # a new request every other step
            requests.append(e.add_request(prompt_token_ids=prompt_ids[len(requests)], params=params))
        e.step()
        step += 1
    assert [r.output_token_ids for r in requests] == expected
    with torch.inference_mode():
        worst = max(max_rel_error(row, smollm2_hf(torch.tensor([prefix])).logits[0, -1])
                    for _, prefix, row in seen[::7])
    assert worst < 1e-4


def test_text_and_chat_template_round_trip(smollm2):
    out = engine(smollm2).generate(["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert "Paris" in out.text
