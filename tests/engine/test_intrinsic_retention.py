"""An intrinsic task keeps the subspace it is decoded through: once the subspace's own task is deleted or
retrained past its history, and the store has collected garbage, a replica that never held the subspace
(a cold load) still serves the intrinsic task exactly as before."""

import time

import pytest
import torch
from helpers import random_prompts

from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.config import CacheConfig, EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=True)
CONFIG = EngineConfig(cache=CacheConfig(num_pages=64))
MAX_HISTORY = 2


def subspace_artifact(engine: LLMEngine, seed: int, d: int = 5, decoder_hidden: int = 32, num_tokens: int = 4) -> bytes:
    hidden = engine.backbone.arch.hidden_size
    g = torch.Generator().manual_seed(seed)
    decoder = {"decoder.0.weight": torch.randn(decoder_hidden, d, generator=g) * 0.3,
               "decoder.0.bias": torch.randn(decoder_hidden, generator=g) * 0.1,
               "decoder.2.weight": torch.randn(num_tokens * hidden, decoder_hidden, generator=g) * 0.3,
               "decoder.2.bias": torch.randn(num_tokens * hidden, generator=g) * 0.1}
    config = {"intrinsic_dim": d, "num_virtual_tokens": num_tokens, "decoder_hidden": decoder_hidden}
    return encode_artifact("subspace", config, decoder, engine.adapters.fingerprint)


def intrinsic_artifact(engine: LLMEngine, subspace: bytes, d: int = 5) -> bytes:
    z = torch.randn(d, generator=torch.Generator().manual_seed(1))
    return encode_artifact("intrinsic", {"subspace_version": artifact_version(subspace)}, {"z": z},
                           engine.adapters.fingerprint)


@pytest.mark.parametrize("subspace_leaves", ["deleted", "retrained"])
def test_a_cold_load_serves_an_intrinsic_task_after_its_subspace_task_moved_on(tiny_backbone, tmp_path,
                                                                               subspace_leaves):
    store = LocalStore(tmp_path / "store", max_history=MAX_HISTORY, gc_grace_s=0.001)
    engine = LLMEngine(tiny_backbone, CONFIG, store)
    subspace = subspace_artifact(engine, seed=0)
    engine.register_adapter("acme/space", subspace)
    engine.register_adapter("acme/ipt", intrinsic_artifact(engine, subspace))
    prompt = random_prompts([7], seed=1)[0]
    warm, base = (engine.generate([prompt], GREEDY, tasks=[task])[0] for task in ("acme/ipt", None))
    assert warm.logprobs != base.logprobs  # the soft prompt really steers the model
    if subspace_leaves == "deleted":
        engine.unregister_adapter("acme/space")
    else:
        for seed in range(1, MAX_HISTORY + 1):
            engine.register_adapter("acme/space", subspace_artifact(engine, seed=seed))
        assert artifact_version(subspace) not in {r.version for r in store.history("acme/space")}
    engine.close()
    store.collect_garbage(now=time.time() + 10**6)

    cold = LLMEngine(tiny_backbone, CONFIG, LocalStore(tmp_path / "store", max_history=MAX_HISTORY))
    served = cold.generate([prompt], GREEDY, tasks=["acme/ipt"])[0]
    assert cold.adapters.cold_loads == 1  # fetched from the store, subspace included
    assert served.finish_reason == warm.finish_reason == "length"  # not "error": its subspace was found
    assert served.token_ids == warm.token_ids and served.logprobs == warm.logprobs
    cold.close()
