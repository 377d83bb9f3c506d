"""The engine on a GPU: the Triton kernels (attention, LoRA) inside the real forward must give the
same tokens as transformers / peft. Runs wherever CUDA is present; CI machines have none."""

import pytest
import torch
from adapter_cases import make_peft_adapter, peft_configs, peft_greedy
from helpers import random_prompts

from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.models.loader import build_backbone
from prefixserve.models.tiny import tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels compiled)")


def test_tiny_engine_on_cuda_matches_transformers_with_every_adapter_kind(smollm2_dir, tmp_path):
    base = tiny_hf_model(seed=4, vocab_size=49152)
    backbone = build_backbone(base.config, base.state_dict(), None, ModelConfig(device="cuda"), name="tiny")
    engine = LLMEngine(backbone, EngineConfig(cache=CacheConfig(num_pages=256)))
    adapters = {}
    for i, (name, config) in enumerate(peft_configs(smollm2_dir).items()):
        adapters[name] = make_peft_adapter(base, config, tmp_path / name, seed=i)
        engine.register_adapter(name, import_peft(tmp_path / name, arch=backbone.arch,
                                                  fingerprint=engine.adapters.fingerprint,
                                                  limits=engine.config.adapters))
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    prompts = random_prompts([3, 17, 40], vocab=49152, seed=8)
    jobs = [(name, prompts[i % 3]) for i, name in enumerate(adapters)] + [(None, prompts[1])]
    outs = engine.generate([p for _, p in jobs], params, tasks=[t for t, _ in jobs])
    for (task, ids), out in zip(jobs, outs):
        expected = peft_greedy(adapters[task], ids, 8) if task else \
            base.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == expected, task


def test_cascade_steps_give_the_tokens_of_the_per_sequence_kernels(monkeypatch):
    """Eight requests on one 160-token task prefix: should_use_cascade picks cascade for their steps,
    and greedy tokens equal those of the same engine with cascade planning turned off."""
    from prefixserve.adapters_store.format import encode_artifact
    from prefixserve.engine import model_runner

    base = tiny_hf_model(seed=5, vocab_size=49152)
    backbone = build_backbone(base.config, base.state_dict(), None, ModelConfig(device="cuda"), name="tiny")
    arch, gen = backbone.arch, torch.Generator().manual_seed(0)
    shape = (arch.num_layers, 160, arch.num_kv_heads, arch.head_dim)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 8, 6], vocab=49152, seed=2)
    planned = []
    plan = model_runner.plan_cascade

    def spy(*args, **kwargs):
        planned.append(plan(*args, **kwargs))
        return planned[-1]

    outputs = []
    for planner in (spy, lambda *args, **kwargs: None):
        monkeypatch.setattr(model_runner, "plan_cascade", planner)
        engine = LLMEngine(backbone, EngineConfig(cache=CacheConfig(num_pages=256)))
        engine.register_adapter("long-prefix", encode_artifact("prefix", {"num_virtual_tokens": 160}, {
            "keys": torch.randn(*shape, generator=gen), "values": torch.randn(*shape, generator=gen)},
            engine.adapters.fingerprint))
        outputs.append([o.token_ids for o in engine.generate(prompts, params, tasks=["long-prefix"] * len(prompts))])
        gen.manual_seed(0)  # the same prefix weights for the second engine
    assert any(p is not None for p in planned)  # cascade really ran
    assert outputs[0] == outputs[1]
