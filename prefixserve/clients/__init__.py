"""The prefixserve Python SDK: sync and async clients over httpx, typed errors, bounded retries.
Imports no torch and no engine: only httpx, pydantic and the server's request/response schemas."""

from prefixserve.clients.async_client import AsyncPrefixServeClient
from prefixserve.clients.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PrefixServeAPIError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from prefixserve.clients.sdk import RetryPolicy, StreamDelta
from prefixserve.clients.sync_client import PrefixServeClient
from prefixserve.server.protocol import ChatMessage, GenerateResponse

__all__ = [
    "AsyncPrefixServeClient", "BadRequestError", "ChatMessage", "GenerateResponse", "NotFoundError",
    "PayloadTooLargeError", "PrefixServeAPIError", "PrefixServeClient", "RateLimitError", "RetryPolicy",
    "ServerError", "ServiceUnavailableError", "StreamDelta",
]
