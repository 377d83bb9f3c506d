"""Every PEFT kind, created and saved by peft, imported and served in ONE running batch together
with the other tasks (IPT, and BitFit and bottleneck adapters against forward hooks on the
transformers model: peft has neither) and plain-backbone requests: greedy tokens equal the
reference's, fp32 logits within 1e-4 of the largest logit; on the tiny model and on SmolLM2."""

import pytest
import torch
from adapter_cases import (
    bitfit_case,
    bottleneck_case,
    intrinsic_case,
    make_peft_adapter,
    peft_configs,
    peft_greedy,
    peft_last_logits,
)
from helpers import capture_logits, hf_greedy, max_rel_error, random_prompts

from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.models.loader import build_backbone
from prefixserve.models.tiny import tiny_hf_model

MAX_NEW = 8
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
PLAIN = (None, "base")
# BitFit biases ~ N(0, 0.02): logits move by 10 % (tiny) and 19 % (SmolLM2) of the largest, which stays its size
BIAS_SCALE = 0.02
# Bottleneck tensors ~ N(0, 0.05): two adapters of different sizes and activations, so the batch groups them apart
BOTTLENECKS = {"adapter-gelu": {"size": 6, "activation": "gelu", "seed": 93},
               "adapter-relu": {"size": 3, "activation": "relu", "seed": 94}}
BOTTLENECK_SCALE = 0.05


def make_adapters(base, tokenizer_dir, root):
    return {name: (make_peft_adapter(base, cfg, root / name, seed=i), root / name)
            for i, (name, cfg) in enumerate(peft_configs(tokenizer_dir).items())}


@pytest.fixture(scope="module")
def tiny_case(smollm2_dir, tmp_path_factory):
    base = tiny_hf_model(seed=4, vocab_size=49152)  # SmolLM2's vocab, so TEXT init can use its tokenizer
    backbone = build_backbone(base.config, base.state_dict(), None, ModelConfig(), name="tiny")
    return base, backbone, make_adapters(base, smollm2_dir, tmp_path_factory.mktemp("peft-tiny"))


@pytest.fixture(scope="module")
def smollm2_case(smollm2_hf, smollm2, smollm2_dir, tmp_path_factory):
    return smollm2_hf, smollm2, make_adapters(smollm2_hf, smollm2_dir, tmp_path_factory.mktemp("peft-smollm2"))


def check_parity(base, backbone, adapters, prompts):
    engine = LLMEngine(backbone, EngineConfig(cache=CacheConfig(num_pages=256)))
    for name, (_, folder) in adapters.items():
        artifact = engine.register_adapter(name, import_peft(folder, arch=backbone.arch,
                                                             fingerprint=engine.adapters.fingerprint,
                                                             limits=engine.config.adapters))
        assert artifact.kind in ("prefix", "prompt", "lora", "ia3")
    subspace, intrinsic, ipt_reference = intrinsic_case(base, engine.adapters.fingerprint)
    engine.register_adapter("ipt-subspace", subspace)
    assert engine.register_adapter("ipt", intrinsic).kind == "intrinsic"
    bitfit, bitfit_reference = bitfit_case(base, engine.adapters.fingerprint, BIAS_SCALE)
    assert engine.register_adapter("bitfit", bitfit).kind == "bitfit"
    references = {"ipt": ipt_reference, "bitfit": bitfit_reference}
    for name, case in BOTTLENECKS.items():
        bottleneck, references[name] = bottleneck_case(base, engine.adapters.fingerprint, BOTTLENECK_SCALE, **case)
        assert engine.register_adapter(name, bottleneck).kind == "adapter"
    hooks_before = [len(m._forward_hooks) for m in base.modules()]
    # fifteen tasks of every kind, plus the plain backbone
    adapters = {**adapters, **{name: (reference, None) for name, reference in references.items()}}
    jobs = [(name, prompts[i % len(prompts)]) for i, name in enumerate(adapters)]
    jobs += [(name, prompts[(i + 1) % len(prompts)]) for i, name in enumerate(adapters)]
    jobs += [(None, prompts[0]), ("base", prompts[-1])]
    seen = capture_logits(engine)
    requests, pending = [], list(jobs)
    while pending or engine.has_unfinished():  # two arrivals a step: prefill overlaps others' decode
        requests += [engine.add_request(prompt_token_ids=ids, params=GREEDY, task=task) for task, ids in pending[:2]]
        pending = pending[2:]
        engine.step()

    for request, (task, ids) in zip(requests, jobs):
        expected = hf_greedy(base, ids, MAX_NEW) if task in PLAIN else peft_greedy(adapters[task][0], ids, MAX_NEW)
        assert request.output_token_ids == expected, task
    worst, steer = {}, {}
    with torch.inference_mode():
        for task, prefix, row in seen[::3]:
            plain_ref = base(torch.tensor([prefix])).logits[0, -1]
            ref = plain_ref if task in PLAIN else peft_last_logits(adapters[task][0], prefix)
            worst[task] = max(worst.get(task, 0.0), max_rel_error(row, ref))
            if task not in PLAIN:
                steer[task] = max(steer.get(task, 0.0), max_rel_error(plain_ref, ref))
    assert max(worst.values()) < 1e-4, worst
    assert min(steer.values()) > 1e-3, steer  # every adapter really changes what the model says
    assert set(steer) == set(adapters)
    assert [len(m._forward_hooks) for m in base.modules()] == hooks_before  # the hooked references left none
    resident = sum(len(h.prefix_pages) for h in engine.adapters.resident.values())
    assert engine.pages.num_free_pages + resident == engine.pages.num_pages


def test_all_peft_kinds_in_one_batch_match_peft_tiny(tiny_case):
    base, backbone, adapters = tiny_case
    check_parity(base, backbone, adapters, random_prompts([3, 17, 9, 30], vocab=49152, seed=8))


@pytest.mark.slow
def test_all_peft_kinds_in_one_batch_match_peft_smollm2(smollm2_case):
    base, backbone, adapters = smollm2_case
    texts = ["The capital of France is", "Review: the food was cold and late. Sentiment:", "def add(a, b):"]
    check_parity(base, backbone, adapters, [backbone.tokenizer(t).input_ids for t in texts])
