"""Redis killed and restarted under a running engine: cached tasks keep serving, uploads fail
cleanly with 503 meanwhile and work again afterwards, and no version is lost."""

import pytest
import torch
from helpers import random_prompts
from redis_server import RedisServer, RedisServerMissing

from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.config import CacheConfig, EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import StoreUnavailableError

PARAMS = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)


def prefix_bytes(engine, seed):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(seed)
    shape = (a.num_layers, 4, a.num_kv_heads, a.head_dim)
    return encode_artifact("prefix", {"num_virtual_tokens": 4},
                           {"keys": torch.randn(shape, generator=g), "values": torch.randn(shape, generator=g)},
                           engine.adapters.fingerprint)


def test_cached_tasks_serve_through_a_redis_outage(tiny_backbone, tmp_path):
    try:
        server = RedisServer(tmp_path / "redis", durable=True).start()
    except RedisServerMissing as e:
        pytest.fail(str(e), pytrace=False)
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=32)),
                       RedisStore(server.url, namespace="outage", socket_timeout=0.5))
    prompt = random_prompts([6], seed=1)[0]
    try:
        v1 = prefix_bytes(engine, seed=1)
        engine.register_adapter("cached", v1)
        before = engine.generate([prompt], PARAMS, tasks=["cached"])[0].token_ids

        server.kill()
        assert engine.generate([prompt], PARAMS, tasks=["cached"])[0].token_ids == before
        with pytest.raises(StoreUnavailableError, match="Redis store at"):
            engine.register_adapter("new", prefix_bytes(engine, seed=2))
        assert "new" not in engine.adapters.tasks()

        server.restart()
        v2 = prefix_bytes(engine, seed=2)
        engine.register_adapter("new", v2)
        assert engine.generate([prompt], PARAMS, tasks=["new"])[0].finish_reason == "length"
        assert engine.store.current("cached") == artifact_version(v1)  # nothing acknowledged was lost
        assert engine.store.current("new") == artifact_version(v2)
    finally:
        engine.close()
        server.stop()
