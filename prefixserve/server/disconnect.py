"""Abort a request whose client has gone, on every route (vLLM's `with_cancellation`).

A streaming response notices a closed connection when its next write fails, and closing the stream
aborts the request. A non-streaming handler writes nothing until the end, so it would generate to
the context end for nobody: the handler runs as a task next to a listener for the ASGI
`http.disconnect` message, and a disconnect cancels the handler, whose output stream closes and
aborts the request in the engine, freeing its pages and adapter hold."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

# nginx's code for "client closed request": nobody reads it, but it marks the access log truthfully.
CLIENT_CLOSED_REQUEST = 499


def with_cancellation(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a route handler that takes `raw_request: Request`; the handler is cancelled as soon as
    its client disconnects. A streaming handler returns its response before that, and the
    response's own disconnect handling takes over."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        handler_task = asyncio.create_task(handler(*args, **kwargs))
        disconnect_task = asyncio.create_task(_wait_for_disconnect(kwargs["raw_request"]))
        try:
            await asyncio.wait([handler_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this wrapper itself is cancelled (server shutdown)
            disconnect_task.cancel()
            if not handler_task.done():
                handler_task.cancel()
                await asyncio.wait([handler_task])  # its output stream closes: the engine aborts the request
        if handler_task.done() and not handler_task.cancelled():
            return handler_task.result()  # its errors propagate to the error handlers
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read before the handler ran, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
