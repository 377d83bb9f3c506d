"""Training jobs over HTTP: submit a job spec to the queue the workers consume, and read its status,
progress and metrics. Task names in a spec are the tenant's own; they are namespaced here, so a job
can only publish to, decode with or learn from the submitting tenant's tasks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute

from prefixserve.adapters_store.store import AdapterStore
from prefixserve.engine.tenancy import tenant_task
from prefixserve.errors import (
    InvalidRequestError,
    NotAvailableError,
    PayloadTooLargeError,
    RateLimitedError,
    TrainingDataError,
)
from prefixserve.server import auth
from prefixserve.server.auth import Caller
from prefixserve.server.protocol import error_responses
from prefixserve.server.quotas import check_job_task_quota
from prefixserve.server.training_protocol import TrainingJob, TrainingJobList, TrainingJobRequest
from prefixserve.training.queue import MAX_LIST_LIMIT, JobQueue, JobRecord, not_found
from prefixserve.training.spec import check_suite_tasks, parse_job_spec

MAX_JOB_BODY_BYTES = 32 << 20  # a few thousand examples; bigger data sets belong in a suite or a file
# Queued or running jobs per tenant: a job takes minutes of a worker, so more than this is one tenant
# filling the shared queue (DEFAULT_MAX_PENDING, all tenants) for everyone else.
MAX_UNFINISHED_JOBS_PER_TENANT = 8
_UNFINISHED_RETRY_AFTER_S = 60.0  # a slot frees when one of the tenant's jobs finishes: minutes, not seconds


def training_router(queue: JobQueue | None, backbone_name: str, store: AdapterStore) -> APIRouter:
    """`store` is read for the tenant's task count (max_tasks) before a job that creates a task is queued."""
    # A spec's body is read by JobSpecRoute (bounded, with a spec's messages for bad JSON); a body without a
    # Content-Type is still read as JSON, as clients of this route have always sent it.
    router = APIRouter(prefix="/v1/training/jobs", tags=["training"], route_class=JobSpecRoute,
                       strict_content_type=False, responses=error_responses(400, 401, 403, 404, 429, 501, 503))
    # Counting a tenant's jobs and queueing one more is one step per replica, so concurrent submissions
    # cannot both take the last slot (across replicas, the check can overshoot by one job per replica).
    submitting = asyncio.Lock()

    def jobs() -> JobQueue:
        if queue is None:
            raise NotAvailableError("this server has no training job queue configured")
        return queue

    @router.post("", status_code=201, responses=error_responses(413))
    async def submit(body: TrainingJobRequest, caller: Caller = Depends(auth.caller)) -> TrainingJob:
        """Queue a training job. A worker (`prefixserve worker`) trains it and publishes the task; poll
        GET /v1/training/jobs/{id} for progress."""
        spec = parse_job_spec(namespaced(body.submitted(), caller.tenant, backbone_name))
        check_suite_tasks(spec)
        async with submitting:
            await asyncio.to_thread(_check_tenant_limits, jobs(), store, caller, spec.task)
            record = await asyncio.to_thread(jobs().submit, spec, caller.tenant)
        return public(record, caller.tenant)

    @router.get("")
    async def list_jobs(caller: Caller = Depends(auth.caller)) -> TrainingJobList:
        """This tenant's jobs, newest first."""
        records = await asyncio.to_thread(jobs().list_jobs, caller.tenant)
        return TrainingJobList(jobs=[public(r, caller.tenant) for r in records])

    @router.get("/{job_id}")
    async def show(job_id: str, caller: Caller = Depends(auth.caller)) -> TrainingJob:
        """Status, attempts, latest progress (step, loss, ETA, eval metrics), final metrics, version, error."""
        record = await asyncio.to_thread(jobs().get, job_id)
        if record.tenant != caller.tenant:  # another tenant's job is answered as a missing one
            raise not_found(job_id)  # the queue's own words for a missing job
        return public(record, caller.tenant)

    return router


def namespaced(raw: dict[str, Any], tenant: str, backbone_name: str) -> dict[str, Any]:
    """The spec with every task name it holds mapped into the tenant's namespace."""
    spec = dict(raw)

    def task_name(value: object, field: str) -> object:
        if not isinstance(value, str) or not value:
            return value  # parse_job_spec says what was expected
        engine_task = tenant_task(tenant, value, backbone_name)
        if engine_task is None:
            raise TrainingDataError(f"expected {field} to name a task, found the plain backbone {value!r}")
        return engine_task

    if "task" in spec:
        spec["task"] = task_name(spec["task"], "'task'")
    hp = spec.get("hyperparameters")
    if isinstance(hp, dict) and "subspace" in hp:
        spec["hyperparameters"] = {**hp, "subspace": task_name(hp["subspace"], "hyperparameters.subspace")}
    if isinstance(spec.get("sources"), list):
        spec["sources"] = [{**s, "task": task_name(s.get("task"), f"sources[{i}].task")} if isinstance(s, dict)
                           else s for i, s in enumerate(spec["sources"])]
    return spec


def public(record: JobRecord, tenant: str) -> TrainingJob:
    """The record as the tenant sees it: its own task names, no worker internals."""
    data = record.to_dict()
    data["task"] = data["task"].removeprefix(f"{tenant}/")
    data.pop("worker_id", None)
    data.pop("publishing_at", None)
    return TrainingJob.model_validate(data)


def _check_tenant_limits(queue: JobQueue, store: AdapterStore, caller: Caller, engine_task: str) -> None:
    """At most MAX_UNFINISHED_JOBS_PER_TENANT queued or running jobs, and no job that would publish a
    task past the tenant's max_tasks (blocking reads: run it off the event loop)."""
    unfinished = [r for r in queue.list_jobs(caller.tenant, limit=MAX_LIST_LIMIT) if not r.status.finished]
    if len(unfinished) >= MAX_UNFINISHED_JOBS_PER_TENANT:
        raise RateLimitedError(f"tenant {caller.tenant!r} has {len(unfinished)} training jobs queued or running; "
                               f"the limit is {MAX_UNFINISHED_JOBS_PER_TENANT}: wait for one to finish",
                               retry_after_s=_UNFINISHED_RETRY_AFTER_S)
    check_job_task_quota(caller, store, engine_task, {r.task for r in unfinished})


class JobSpecRoute(APIRoute):
    """A route whose JSON body is read here before FastAPI validates it: at most MAX_JOB_BODY_BYTES (413
    past them, never holding more) and parsed with a job spec's messages, for invalid JSON and for JSON
    nested too deeply to parse, which FastAPI would answer with a bare "error parsing the body"."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle

        async def read_spec_first(request: Request) -> Response:
            spec_request = _JobSpecRequest(request.scope, request.receive)
            await spec_request.json()  # a 413 or 400 before validation; FastAPI then reads what it read
            return await handle(spec_request)

        return read_spec_first


_UNREAD = object()


class _JobSpecRequest(Request):
    """A request whose body and JSON are read once, by `_bounded_body` and `_parse_spec_json`."""

    _spec_body: bytes | None = None
    _spec_json: Any = _UNREAD

    async def body(self) -> bytes:
        if self._spec_body is None:
            self._spec_body = await _bounded_body(self)
        return self._spec_body

    async def json(self) -> Any:
        if self._spec_json is _UNREAD:
            self._spec_json = _parse_spec_json(await self.body())
        return self._spec_json


async def _bounded_body(request: Request) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_JOB_BODY_BYTES:
            raise PayloadTooLargeError(f"training job specs are limited to {MAX_JOB_BODY_BYTES} bytes; this one is "
                                       f"larger (use a suite task, or fewer examples)")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_spec_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"expected a JSON job spec, found invalid JSON: {exc}") from None
    except RecursionError:  # json.loads recurses once per nesting level; a spec is a few levels deep
        raise InvalidRequestError("expected a JSON job spec, found JSON nested too deeply to parse") from None
