"""10,000 registered tasks behind a host cache of a few KB and a small KV pool: memory stays
bounded, a version in use is never evicted, and every request gets its own task's tokens."""

import random

import torch
from helpers import random_prompts

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

NUM_TASKS = 10_000
HOST_CACHE_BYTES = 16 << 10
PARAMS = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


def prefix_bytes(arch, fingerprint, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    num_tokens = 1 + seed % 3
    shape = (arch.num_layers, num_tokens, arch.num_kv_heads, arch.head_dim)
    return encode_artifact("prefix", {"num_virtual_tokens": num_tokens},
                           {"keys": torch.randn(shape, generator=g), "values": torch.randn(shape, generator=g)},
                           fingerprint)


def test_ten_thousand_tasks_stay_bounded_and_in_use_adapters_stay(tiny_backbone, redis_url, redis_namespace):
    store = RedisStore(redis_url, namespace=redis_namespace)  # 10,000 durable LocalStore fsyncs would take a minute
    config = EngineConfig(cache=CacheConfig(num_pages=40), host_cache_bytes=HOST_CACHE_BYTES,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    engine = LLMEngine(tiny_backbone, config, store)
    arch, fingerprint = tiny_backbone.arch, engine.adapters.fingerprint
    for i in range(NUM_TASKS):  # uploads by another client: this engine learns of them lazily
        store.put(f"tenant/task-{i:05d}", prefix_bytes(arch, fingerprint, i), "prefix")
    assert len(store.list_tasks("tenant/")) == NUM_TASKS

    rng = random.Random(0)
    chosen = rng.sample(range(NUM_TASKS), 60)
    prompts = random_prompts([5] * len(chosen), seed=3)
    requests = []
    for i, (task_id, prompt) in enumerate(zip(chosen, prompts)):
        requests.append(engine.add_request(prompt_token_ids=prompt, params=PARAMS, task=f"tenant/task-{task_id:05d}"))
        if i % 3 == 2:
            engine.step()
            check_invariants(engine)
    while engine.has_unfinished():
        engine.step()
        check_invariants(engine)
    assert all(r.num_output_tokens == PARAMS.max_new_tokens for r in requests)
    assert engine.adapters.cold_loads >= len(set(chosen)) - len(engine.adapters.host)
    assert engine.adapters.host.evictions > 0  # the cache really was too small to keep them all

    # Each request got its own task: compare a sample with a fresh engine serving that task alone.
    for request, task_id, prompt in list(zip(requests, chosen, prompts))[:6]:
        alone = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=16)))
        alone.register_adapter("t", prefix_bytes(arch, fingerprint, task_id))
        assert alone.generate([prompt], PARAMS, tasks=["t"])[0].token_ids == request.output_token_ids
        alone.close()
    engine.close()


def check_invariants(engine):
    adapters = engine.adapters
    assert adapters.host.num_bytes <= HOST_CACHE_BYTES
    resident_pages = sum(len(h.prefix_pages) for h in adapters.resident.values())
    request_pages = sum(len(r.page_ids) for r in engine.scheduler.running)
    assert resident_pages + request_pages + engine.pages.num_free_pages == engine.pages.num_pages
    for request in engine.scheduler.running:
        handle = request.adapter
        assert handle is not None and adapters.resident.get(handle.version) is handle  # in use: never evicted
        assert all(engine.pages.ref_count(p) >= 1 + handle.num_users for p in handle.prefix_pages)
