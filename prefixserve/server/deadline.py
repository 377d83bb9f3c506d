"""A per-request time limit over an engine output stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from prefixserve.engine.request import RequestOutput
from prefixserve.errors import RequestTimeoutError


async def with_deadline(outputs: AsyncIterator[RequestOutput], timeout_s: float) -> AsyncIterator[RequestOutput]:
    """Pass outputs through until `timeout_s` after the call; then raise RequestTimeoutError. Either
    way `outputs` is closed, which aborts the request in the engine and frees its KV pages."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    out = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeoutError(f"the request ran longer than the server's limit of {timeout_s:g} s "
                                          f"and was stopped") from None
            yield out
    finally:
        await outputs.aclose()
