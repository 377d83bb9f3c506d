"""Typed errors of the SDK, built from the server's one error shape `{"error": {"type", "message"}}`."""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from prefixserve.server.protocol import ErrorResponse


class PrefixServeAPIError(Exception):
    """The server answered with an error: `status` (HTTP code), `type` (the server's error type), `message`."""

    def __init__(self, status: int, type: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.retry_after_s = retry_after_s  # the server's Retry-After hint, when it sent one


class BadRequestError(PrefixServeAPIError):
    """400: the request's parameters or upload are not acceptable."""


class NotFoundError(PrefixServeAPIError):
    """404: the task (or route) does not exist."""


class PayloadTooLargeError(PrefixServeAPIError):
    """413: an upload is larger than the server's limit."""


class RateLimitError(PrefixServeAPIError):
    """429: too many requests; retried by the client before this is raised."""


class ServerError(PrefixServeAPIError):
    """5xx: the server failed."""


class ServiceUnavailableError(ServerError):
    """503: overloaded, not ready, or the adapter store is down; retried by the client before this is raised."""


_BY_STATUS: dict[int, type[PrefixServeAPIError]] = {
    400: BadRequestError, 404: NotFoundError, 413: PayloadTooLargeError, 429: RateLimitError,
    503: ServiceUnavailableError,
}
# An error event mid-stream carries no status code: the server's error types name it.
_STATUS_OF_TYPE = {
    "invalid_request": 400, "invalid_adapter": 400, "task_not_found": 404, "payload_too_large": 413,
    "overloaded": 503, "store_unavailable": 503, "engine_dead": 503, "not_ready": 503,
}


def api_error(status: int, type: str, message: str, retry_after_s: float | None = None) -> PrefixServeAPIError:
    """The typed error for `status`."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else PrefixServeAPIError)
    return cls(status, type, message, retry_after_s)


def error_from_response(response: httpx.Response, retry_after_s: float | None = None) -> PrefixServeAPIError:
    """The typed error for a non-2xx response (already read); a body not in the server's shape becomes the message."""
    try:
        body = ErrorResponse.model_validate_json(response.content).error
        kind, message = body.type, body.message
    except ValidationError:  # a proxy's page, or a route the server does not have
        kind, message = "http_error", response.text[:500] or response.reason_phrase
    return api_error(response.status_code, kind, message, retry_after_s)


def error_from_event(error: dict) -> PrefixServeAPIError:
    """The typed error for a `data: {"error": {...}}` event in a stream."""
    kind = str(error.get("type", "internal_error"))
    return api_error(_STATUS_OF_TYPE.get(kind, 500), kind, str(error.get("message", "the stream failed")))
