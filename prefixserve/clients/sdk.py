"""What the sync and async clients share: request bodies, the retry policy, SSE parsing, upload packing.
No I/O happens here, so both clients run exactly the same rules."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from prefixserve.clients.errors import PrefixServeAPIError, error_from_event
from prefixserve.server.protocol import GenerateRequest

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class StreamDelta:
    """One streamed step: the new text and token ids; `finish_reason` is set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 and 503 only, at most `max_retries` times, waiting what Retry-After says (capped at
    `max_wait_s`), else `backoff_s * 2**attempt` with jitter so that many clients do not retry in step."""

    max_retries: int = 3
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def wait_s(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying after failed attempt number `attempt` (0-based); None: do not retry."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        hinted = retry_after_s(response.headers)
        if hinted is None:
            hinted = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
        return min(hinted, self.max_wait_s)


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Retry-After as seconds (it may be a number of seconds or an HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def client_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def generate_body(stream: bool, **fields: Any) -> dict[str, Any]:
    """The /v1/generate JSON body, checked by the server's own schema first: an unknown field or a missing
    prompt raises pydantic's ValidationError (a ValueError) here, before anything is sent."""
    return GenerateRequest(stream=stream, **fields).model_dump(exclude_none=True)


def job_path(job_id: str) -> str:
    return "/v1/training/jobs/" + quote(job_id, safe="")


def task_path(task: str, suffix: str = "") -> str:
    return f"/v1/tasks/{quote(task, safe='')}{suffix}"


def upload_file(artifact: str | os.PathLike | bytes) -> tuple[str, bytes, str]:
    """The multipart `file` for an upload: bytes as they are, a file's bytes, or a PEFT folder packed
    into a .tar.gz in memory (the server tells artifacts and archives apart by their content)."""
    if isinstance(artifact, bytes | bytearray):
        return "adapter.bin", bytes(artifact), "application/octet-stream"
    path = Path(artifact)
    if path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(path, arcname=path.name or "adapter")
        return f"{path.name or 'adapter'}.tar.gz", buffer.getvalue(), "application/gzip"
    if not path.is_file():
        raise FileNotFoundError(f"expected an adapter file or PEFT folder at {str(path)!r}; nothing is there")
    return path.name, path.read_bytes(), "application/octet-stream"


DONE = object()  # the `data: [DONE]` event


def parse_sse_line(line: str) -> StreamDelta | object | None:
    """One line of the event stream: a StreamDelta, DONE, or None for blank lines and comments.
    An error event raises the typed error the same failure would have raised as a status code."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    event = json.loads(data)
    if "error" in event:
        raise error_from_event(event["error"])
    return StreamDelta(event["text"], event["token_ids"], event["finish_reason"])


def incomplete_stream() -> PrefixServeAPIError:
    return PrefixServeAPIError(200, "incomplete_stream", "the event stream ended before its [DONE] event")
