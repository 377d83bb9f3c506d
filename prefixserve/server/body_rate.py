"""A minimum rate for request bodies (Apache's mod_reqtimeout `MinRate`, as ASGI middleware).

uvicorn bounds how long a connection may idle between requests, not how long one request's body may
take: a client that sends an upload's bytes one at a time keeps a connection, a handler and its
buffers forever. After a grace period, the body must keep arriving at `min_bytes_per_s` on average,
or the read fails with BodyTooSlowError, which the error handlers answer with a 408. Reading what
follows the body (the disconnect that `with_cancellation` waits for) is never timed."""

from __future__ import annotations

import asyncio

from prefixserve.errors import BodyTooSlowError

DEFAULT_MIN_BYTES_PER_S = 8 << 10  # 64 kbit/s: a slow mobile link still uploads at many times this
DEFAULT_GRACE_S = 20.0  # time for the first bytes (and for a small body, all of it) whatever the rate


class MinimumBodyRate:
    def __init__(self, app, min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S, grace_s: float = DEFAULT_GRACE_S):
        if not (min_bytes_per_s > 0 and grace_s > 0):
            raise ValueError(f"expected a positive body rate and grace period, found {min_bytes_per_s} B/s and "
                             f"{grace_s} s")
        self.app, self.min_bytes_per_s, self.grace_s = app, min_bytes_per_s, grace_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start, received, body_done = loop.time(), 0, False

        async def timed_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            # The body so far must have come at the minimum rate once the grace period is over.
            deadline = start + self.grace_s + received / self.min_bytes_per_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTooSlowError(
                    f"the request body arrived slower than the server's minimum of {self.min_bytes_per_s:g} bytes/s "
                    f"after a {self.grace_s:g} s grace period ({received} bytes in {loop.time() - start:.1f} s); "
                    f"the request was dropped") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # a disconnect: nothing more will come
            return message

        return await self.app(scope, timed_receive, send)
