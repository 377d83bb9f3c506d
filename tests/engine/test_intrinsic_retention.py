"""An intrinsic task keeps the subspace it is decoded through: once the subspace's own task is deleted or
retrained past its history, and the store has collected garbage, a replica that never held the subspace
(a cold load) still serves the intrinsic task exactly as before."""

import time

import pytest
from adapter_cases import ipt_artifacts
from helpers import random_prompts

from prefixserve.adapters_store.format import artifact_version
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.config import CacheConfig, EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=True)
CONFIG = EngineConfig(cache=CacheConfig(num_pages=64))
MAX_HISTORY = 2


@pytest.mark.parametrize("subspace_leaves", ["deleted", "retrained"])
def test_a_cold_load_serves_an_intrinsic_task_after_its_subspace_task_moved_on(tiny_backbone, tmp_path,
                                                                               subspace_leaves):
    store = LocalStore(tmp_path / "store", max_history=MAX_HISTORY, gc_grace_s=0.001)
    engine = LLMEngine(tiny_backbone, CONFIG, store)
    hidden, fingerprint = engine.backbone.arch.hidden_size, engine.adapters.fingerprint
    subspace, intrinsic, *_ = ipt_artifacts(hidden, fingerprint, seed=0)
    engine.register_adapter("acme/space", subspace)
    engine.register_adapter("acme/ipt", intrinsic)
    prompt = random_prompts([7], seed=1)[0]
    warm, base = (engine.generate([prompt], GREEDY, tasks=[task])[0] for task in ("acme/ipt", None))
    assert warm.logprobs != base.logprobs  # the soft prompt really steers the model
    if subspace_leaves == "deleted":
        engine.unregister_adapter("acme/space")
    else:
        for seed in range(1, MAX_HISTORY + 1):
            engine.register_adapter("acme/space", ipt_artifacts(hidden, fingerprint, seed=seed)[0])
        assert artifact_version(subspace) not in {r.version for r in store.history("acme/space")}
    engine.close()
    store.collect_garbage(now=time.time() + 10**6)

    cold = LLMEngine(tiny_backbone, CONFIG, LocalStore(tmp_path / "store", max_history=MAX_HISTORY))
    served = cold.generate([prompt], GREEDY, tasks=["acme/ipt"])[0]
    assert cold.adapters.cold_loads == 1  # fetched from the store, subspace included
    assert served.finish_reason == warm.finish_reason == "length"  # not "error": its subspace was found
    assert served.token_ids == warm.token_ids and served.logprobs == warm.logprobs
    cold.close()
