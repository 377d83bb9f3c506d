"""PrefixServeClient: the blocking SDK over httpx."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from prefixserve.clients import sdk
from prefixserve.clients.errors import error_from_response
from prefixserve.server.protocol import ChatMessage, GenerateResponse


class PrefixServeClient:
    """A blocking client for a prefixserve server. Retries 429/503 per `sdk.RetryPolicy`; every other
    error status raises its typed `PrefixServeAPIError` subclass at once. `sleep` and `transport` are
    for tests (a fake clock, httpx.MockTransport)."""

    def __init__(self, base_url: str = sdk.DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = 60.0, max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=base_url, headers=sdk.client_headers(api_key), timeout=timeout,
                                  transport=transport)
        self._retry = sdk.RetryPolicy(max_retries=max_retries, max_wait_s=max_retry_wait_s)
        self._sleep = sleep

    def __enter__(self) -> PrefixServeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, method: str, path: str, *, stream: bool = False, retry: bool = True,
              **kwargs: Any) -> httpx.Response:
        """Send, retrying 429/503; a streamed response is retried only while its status says it failed,
        i.e. before any event arrived."""
        attempt = 0
        while True:
            response = self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
            if response.is_success:
                return response
            response.read()
            response.close()
            wait = self._retry.wait_s(attempt, response) if retry else None
            if wait is None:
                raise error_from_response(response, sdk.retry_after_s(response.headers))
            self._sleep(wait)
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def generate(self, prompt: str | None = None, *, messages: list[ChatMessage | dict] | None = None,
                 task: str | None = None, max_new_tokens: int = 16, **sampling: Any) -> GenerateResponse:
        """Generate a completion of `prompt` (or of chat `messages`) with `task`'s adapter (None: the plain
        backbone). `sampling` takes the other GenerateRequest fields: temperature, top_p, top_k, seed, stop,
        stop_token_ids, ignore_eos, min_tokens, logprobs."""
        body = sdk.generate_body(False, prompt=prompt, messages=messages, task=task,
                                 max_new_tokens=max_new_tokens, **sampling)
        return GenerateResponse.model_validate(self._json("POST", "/v1/generate", json=body))

    def stream_generate(self, prompt: str | None = None, *, messages: list[ChatMessage | dict] | None = None,
                        task: str | None = None, max_new_tokens: int = 16,
                        **sampling: Any) -> Iterator[sdk.StreamDelta]:
        """Like `generate`, but yields StreamDeltas as the server produces them. The request is sent on the
        first iteration; stopping early (break, or `.close()`) closes the HTTP stream, which aborts the
        request on the server. An error event mid-stream raises its typed error."""
        body = sdk.generate_body(True, prompt=prompt, messages=messages, task=task,
                                 max_new_tokens=max_new_tokens, **sampling)
        response = self._send("POST", "/v1/generate", json=body, stream=True)
        try:
            for line in response.iter_lines():
                event = sdk.parse_sse_line(line)
                if event is sdk.DONE:
                    return
                if event is not None:
                    yield event
            raise sdk.incomplete_stream()
        finally:
            response.close()

    def upload_task(self, task: str, artifact: str | os.PathLike | bytes) -> dict:
        """Register a new version of `task` from a prefixserve .safetensors artifact, a PEFT archive
        (.tar/.tar.gz/.zip), or a PEFT folder (packed here); returns {task, kind, version, num_bytes}."""
        return self._json("PUT", sdk.task_path(task), files={"file": sdk.upload_file(artifact)})

    def list_tasks(self) -> list[dict]:
        """Every registered task with its current version: [{task, version}]."""
        return self._json("GET", "/v1/tasks")["tasks"]

    def get_task(self, task: str) -> dict:
        """`task`'s current version, kind, size, residency and version history."""
        return self._json("GET", sdk.task_path(task))

    def rollback_task(self, task: str, version: str | None = None) -> dict:
        """Make `version` (None: the one before the current) current again; returns {task, version}."""
        return self._json("POST", sdk.task_path(task, "/rollback"), json={"version": version})

    def delete_task(self, task: str) -> dict:
        """Unregister `task`; returns {task, deleted}."""
        return self._json("DELETE", sdk.task_path(task))

    def submit_training_job(self, spec: dict) -> dict:
        """Queue a training job (task, kind, examples | suite_task, hyperparameters, ...); returns its record
        ({id, status, ...}). Submissions are not retried: a 503 means the job queue is full."""
        return self._json("POST", "/v1/training/jobs", json=spec, retry=False)

    def get_training_job(self, job_id: str) -> dict:
        """A job's status, attempts, latest progress (step, loss, ETA, eval metrics), metrics and version."""
        return self._json("GET", sdk.job_path(job_id))

    def list_training_jobs(self) -> list[dict]:
        """This tenant's training jobs, newest first."""
        return (self._json("GET", "/v1/training/jobs"))["jobs"]

    def health(self) -> dict:
        """The liveness probe: {"status": "ok"} while the process answers."""
        return self._json("GET", "/health")

    def ready(self) -> dict:
        """The readiness probe: {status, backbone}; raises ServiceUnavailableError (never retried) with the
        reason when the engine or the adapter store is down."""
        return self._json("GET", "/ready", retry=False)
