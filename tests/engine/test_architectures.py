"""Llama-family variants the loader claims: llama3 RoPE scaling, Qwen2 (q/k/v bias), Mistral.
Each is a tiny random transformers model; our engine must reproduce its greedy tokens and logits."""

import pytest
import torch
from helpers import hf_greedy, max_rel_error, random_prompts
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import ModelLoadError
from prefixserve.models.loader import build_backbone
from prefixserve.models.tiny import tiny_hf_model, tiny_llama_config

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def llama3_scaled():
    return tiny_hf_model(seed=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


def qwen2():
    torch.manual_seed(2)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, architectures=["Qwen2ForCausalLM"])).eval()


def mistral():
    torch.manual_seed(3)
    return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=128, architectures=["MistralForCausalLM"])).eval()


@pytest.mark.parametrize("make_model", [llama3_scaled, qwen2, mistral], ids=["llama3-rope", "qwen2-bias", "mistral"])
def test_variant_matches_transformers(make_model):
    hf = make_model()
    backbone = build_backbone(hf.config, hf.state_dict(), None, ModelConfig(), name="variant")
    engine = LLMEngine(backbone, EngineConfig(cache=CacheConfig(num_pages=64)))
    prompts = random_prompts([3, 40, 90], seed=5)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == [hf_greedy(hf, p, 10) for p in prompts]
    with torch.inference_mode():
        first = engine.generate([prompts[1]], SamplingParams(max_new_tokens=1, temperature=0, logprobs=True))[0]
        ref = torch.log_softmax(hf(torch.tensor([prompts[1]])).logits[0, -1], -1)[first.token_ids[0]]
    assert abs(first.logprobs[0] - float(ref)) < 1e-4
    if make_model is qwen2:
        assert backbone.arch.qkv_bias
    if make_model is mistral:
        assert backbone.max_model_len == 128  # never past the sliding window, where it equals full attention


def test_tiny_prefill_logits_within_tolerance(tiny_hf, tiny_backbone):
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=32)))
    prompt = random_prompts([50], seed=9)[0]
    request = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_new_tokens=1, temperature=0))
    step = engine.scheduler.schedule()
    input_ids, positions, meta, *_ = engine.runner._prepare(step)
    with torch.inference_mode():
        model = tiny_backbone.model
        ours = model.compute_logits(model(model.embed(input_ids), positions, meta, engine.runner.kv_cache))
        ref = tiny_hf(torch.tensor([prompt])).logits[0]
    assert request.num_prompt_tokens == 50
    assert max_rel_error(ours, ref) < 1e-4


def test_unsupported_architecture_is_refused():
    config = tiny_llama_config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="expected one of LlamaForCausalLM.*found GPT2LMHeadModel"):
        build_backbone(config, {}, None, ModelConfig(), name="gpt2")


def test_pickled_checkpoint_is_refused(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    from prefixserve.models import load_backbone

    with pytest.raises(ModelLoadError, match="pickled .*never unpickled"):
        load_backbone(ModelConfig(source=str(tmp_path)))
