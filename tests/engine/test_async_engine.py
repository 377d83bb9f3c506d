"""The async engine: many concurrent requests, aborts that free pages, bounded admission."""

import asyncio

import pytest
from helpers import random_prompts

from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import EngineOverloadedError, InvalidRequestError

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


async def collect(engine, prompt, params=GREEDY):
    tokens = []
    async for out in engine.generate(prompt_token_ids=prompt, params=params):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_requests_match_the_sync_engine(make_tiny_engine):
    prompts = random_prompts([3, 17, 40, 8, 25, 1, 60, 12, 5, 33], seed=11)
    expected = [c.token_ids for c in make_tiny_engine().generate(prompts, GREEDY)]
    engine = AsyncEngine(make_tiny_engine())

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_leaving_the_stream_aborts_and_frees_pages(make_tiny_engine):
    sync = make_tiny_engine()
    engine = AsyncEngine(sync)

    async def main():
        stream = engine.generate(prompt_token_ids=[5] * 40, params=SamplingParams(max_new_tokens=200,
                                                                                    ignore_eos=True))
        async for out in stream:
            assert not out.finished
            break  # the client goes away after the first token
        await stream.aclose()
        for _ in range(200):
            if not sync.has_unfinished():
                break
            await asyncio.sleep(0.01)
        # the engine keeps serving others afterwards
        return await collect(engine, [7, 8, 9])

    try:
        assert len(asyncio.run(main())) == GREEDY.max_new_tokens
        assert not sync.has_unfinished()
        assert sync.pages.num_free_pages == sync.pages.num_pages
    finally:
        engine.shutdown()


def test_invalid_request_raises_before_streaming(make_tiny_engine):
    engine = AsyncEngine(make_tiny_engine())

    async def main():
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            await collect(engine, [])

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_admission_is_bounded(make_tiny_engine):
    engine = AsyncEngine(make_tiny_engine(max_num_seqs=1, max_num_batched_tokens=16, max_waiting=2))
    long = SamplingParams(max_new_tokens=150, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine, [5, 6], long)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError, match="queue is full"):
            await collect(engine, [5, 6])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
