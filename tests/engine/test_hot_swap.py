"""Two engine replicas sharing one Redis: an upload through one is served by the other within a
second, and a request streaming on v1 during the swap finishes on v1, token for token."""

import time

import torch
from helpers import random_prompts

from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.config import CacheConfig, EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

LONG = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def prefix_bytes(engine, seed, num_tokens=6):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(seed)
    shape = (a.num_layers, num_tokens, a.num_kv_heads, a.head_dim)
    return encode_artifact("prefix", {"num_virtual_tokens": num_tokens},
                           {"keys": torch.randn(shape, generator=g), "values": torch.randn(shape, generator=g)},
                           engine.adapters.fingerprint)


def solo(backbone, data, prompt, params):
    """What a replica that only ever saw this version answers."""
    engine = LLMEngine(backbone, EngineConfig(cache=CacheConfig(num_pages=32)))
    engine.register_adapter("t", data)
    tokens = engine.generate([prompt], params, tasks=["t"])[0].token_ids
    engine.close()
    return tokens


def test_upload_on_one_replica_is_served_by_the_other(tiny_backbone, redis_url, redis_namespace):
    config = EngineConfig(cache=CacheConfig(num_pages=64))
    a = LLMEngine(tiny_backbone, config, RedisStore(redis_url, namespace=redis_namespace))
    b = LLMEngine(tiny_backbone, config, RedisStore(redis_url, namespace=redis_namespace))
    prompt = random_prompts([7], seed=2)[0]
    v1, v2 = prefix_bytes(a, seed=1), prefix_bytes(a, seed=2, num_tokens=9)
    try:
        a.register_adapter("acme/support", v1)
        streaming = b.add_request(prompt_token_ids=prompt, params=LONG, task="acme/support")  # b fetches v1
        for _ in range(5):
            b.step()
        assert streaming.num_output_tokens > 0 and streaming.adapter.version == artifact_version(v1)

        uploaded = time.monotonic()
        a.register_adapter("acme/support", v2)  # hot swap through the other replica
        while b.adapters.resolve("acme/support") != artifact_version(v2):
            assert time.monotonic() - uploaded < 1.0, "replica b did not see the upload within 1 s"
            b.step()  # b keeps serving its running request meanwhile
            time.sleep(0.005)
        fresh = b.add_request(prompt_token_ids=prompt, params=SHORT, task="acme/support")
        while fresh.num_output_tokens == 0:
            b.step()
        assert time.monotonic() - uploaded < 1.0, "the first v2 token on replica b came later than 1 s"
        while b.has_unfinished():
            b.step()
        assert streaming.output_token_ids == solo(tiny_backbone, v1, prompt, LONG)
        assert fresh.output_token_ids == solo(tiny_backbone, v2, prompt, SHORT)
        assert list(b.adapters.resident) == [artifact_version(v2)]  # v1 left with its last request
    finally:
        a.close()
        b.close()
