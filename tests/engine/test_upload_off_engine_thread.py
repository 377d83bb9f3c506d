"""An upload never stalls the step loop: while one tenant's upload is stuck in the store write (a
slow disk's fsyncs, a Redis round trip) or in decoding, every other request's tokens keep coming;
the engine thread only compiles the version between two steps."""

import asyncio

import pytest
import torch
from helpers import GatedStore

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

NEW_TOKENS = 40


def prompt_artifact(engine, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, engine.backbone.arch.hidden_size, generator=g) * 0.3
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings},
                           engine.adapters.fingerprint)


@pytest.fixture
def gated(tiny_backbone, tmp_path):
    store = GatedStore(tmp_path / "store")
    sync = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(page_size=16, num_pages=64),
                                                 scheduler=SchedulerConfig(max_num_seqs=8)), store)
    engine = AsyncEngine(sync)
    yield engine, sync, store
    store.gate.set()
    engine.shutdown()
    sync.close()


def test_other_requests_finish_while_an_upload_waits_on_the_store(gated):
    engine, sync, store = gated
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    async def main():
        upload = asyncio.create_task(engine.register_adapter("tenant/new", prompt_artifact(sync, seed=1)))
        assert await asyncio.to_thread(store.writing.wait, 30), "the upload never reached the store"
        tokens = []
        async for out in engine.generate(prompt_token_ids=[5, 6, 7], params=params):
            tokens += out.new_token_ids
        # Every token of another request came while the upload was still inside the store write.
        assert len(tokens) == NEW_TOKENS and not upload.done()
        assert not sync.adapters.knows("tenant/new")
        store.gate.set()
        artifact = await upload
        served = [t async for out in engine.generate(prompt_token_ids=[5, 6, 7], params=params, task="tenant/new")
                  for t in out.new_token_ids]
        return artifact, served

    artifact, served = asyncio.run(main())
    assert store.current("tenant/new") == artifact.version
    assert len(served) == NEW_TOKENS and sync.adapters.residency(artifact.version) == "device"


def test_a_refused_upload_costs_the_engine_thread_nothing_and_stores_nothing(gated):
    engine, sync, store = gated
    store.gate.set()
    calls = []
    original = engine.call

    async def counting_call(fn):
        calls.append(fn)
        return await original(fn)

    engine.call = counting_call

    async def main():
        with pytest.raises(Exception, match="safetensors|artifact"):
            await engine.register_adapter("tenant/junk", b"definitely not an artifact")

    asyncio.run(main())
    assert calls == []  # refused while decoding, on a worker thread
    assert store.current("tenant/junk") is None and not store.writing.is_set()
