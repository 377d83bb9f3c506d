"""Tasks over HTTP: upload (a prefixserve artifact or a PEFT folder archived as .tar/.tar.gz/.zip),
list, show, roll back, delete. Decoding and store writes run on worker threads and only the compile on
the engine thread, so an upload never stalls other tenants' tokens; the uploading replica serves the
new version from its next request, other replicas hear it from the store."""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, Depends, File, UploadFile
from pydantic import BaseModel, Field

from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.adapters_store.store import blob_version
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.tenancy import tenant_task, tenant_tasks
from prefixserve.errors import EngineOverloadedError, PayloadTooLargeError, TaskNotFoundError
from prefixserve.server import auth
from prefixserve.server.auth import Caller
from prefixserve.server.protocol import (
    TaskDeleted,
    TaskInfo,
    TaskList,
    TaskListEntry,
    TaskRecord,
    TaskRollback,
    TaskVersion,
    accepts,
    error_responses,
)
from prefixserve.server.quotas import check_store_quota

_CHUNK = 1 << 20
# Uploads being read, decoded and stored at once on one replica: each holds its bytes (up to
# max_artifact_bytes) and their decoded tensors in memory, so past this they are refused, not queued.
MAX_UPLOADS_IN_FLIGHT = 4
_UPLOADS_RETRY_AFTER_S = 2.0


class RollbackBody(BaseModel):
    # None: the version before the current one. Versions are sha256 hex digests (the store checks it).
    version: str | None = Field(None, json_schema_extra=accepts(string={"pattern": "^[0-9a-f]{64}$"}))


class UploadSlots:
    """How many uploads this replica is processing (event loop only, so no lock); one past the limit is
    refused with EngineOverloadedError (503, Retry-After)."""

    def __init__(self, limit: int = MAX_UPLOADS_IN_FLIGHT):
        self.limit, self.in_flight = limit, 0

    @contextlib.contextmanager
    def hold(self):
        if self.in_flight >= self.limit:
            raise EngineOverloadedError(f"this server is processing {self.limit} uploads already (its limit); "
                                        f"retry shortly", retry_after_s=_UPLOADS_RETRY_AFTER_S)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def tasks_router(engine: AsyncEngine, uploads: UploadSlots) -> APIRouter:
    router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
    sync = engine.engine
    limits = sync.config.adapters

    def name(caller: Caller, task: str) -> str:
        engine_task = tenant_task(caller.tenant, task, sync.backbone.name)
        if engine_task is None:
            raise TaskNotFoundError(f"{task!r} is the plain backbone, not a task")
        return engine_task

    @router.put("/{task}", status_code=201, responses=error_responses(400, 401, 403, 404, 413, 429, 503))
    async def upload(task: str, file: UploadFile = File(...), caller: Caller = Depends(auth.caller)) -> TaskVersion:
        engine_task = name(caller, task)
        with uploads.hold():
            return await _store_upload(task, engine_task, file, caller)

    async def _store_upload(task: str, engine_task: str, file: UploadFile, caller: Caller) -> TaskVersion:
        data = await _read_bounded(file, limits.max_artifact_bytes)
        if not _is_safetensors(data):  # a PEFT adapter archive: convert it (CPU work, at low priority)
            data = await engine.background.run(lambda: import_peft(
                data, arch=sync.backbone.arch, fingerprint=sync.adapters.fingerprint, limits=limits,
                dtype=sync.runner.dtype))
        # A version the tenant already retains (the same bytes under another task) adds no bytes.
        await engine.background.run(lambda: check_store_quota(caller, sync.store, engine_task, len(data),
                                                              blob_version(data)))
        # Validated in full (every derived value, in the engine's dtype) and compiled before it is stored:
        # a refused version is never left as the task's current one.
        artifact = await engine.register_adapter(engine_task, data)
        return TaskVersion(task=task, kind=artifact.kind, version=artifact.version, num_bytes=artifact.num_bytes)

    @router.get("", responses=error_responses(401, 403, 503))
    async def list_tasks(caller: Caller = Depends(auth.caller)) -> TaskList:
        tenant = caller.tenant
        current = await asyncio.to_thread(sync.store.list_tasks, f"{tenant}/")
        return TaskList(tasks=[TaskListEntry(task=t, version=current[f"{tenant}/{t}"])
                               for t in tenant_tasks(tenant, current)])

    @router.get("/{task}", responses=error_responses(400, 401, 403, 404, 503))
    async def show(task: str, caller: Caller = Depends(auth.caller)) -> TaskInfo:
        engine_task = name(caller, task)
        history = await asyncio.to_thread(sync.store.history, engine_task)
        if not history:
            raise TaskNotFoundError(f"task {task!r} is not registered")
        current = history[0]
        return TaskInfo(task=task, kind=current.kind, version=current.version, num_bytes=current.num_bytes,
                        residency=sync.adapters.residency(current.version),
                        card=current.card,
                        history=[TaskRecord(version=r.version, kind=r.kind, num_bytes=r.num_bytes,
                                            created_at=r.created_at, card=r.card) for r in history])

    @router.post("/{task}/rollback", responses=error_responses(400, 401, 403, 404, 503))
    async def rollback(task: str, body: RollbackBody | None = None,
                       caller: Caller = Depends(auth.caller)) -> TaskRollback:
        engine_task = name(caller, task)
        version = await engine.rollback_adapter(engine_task, body.version if body else None)
        return TaskRollback(task=task, version=version)

    @router.delete("/{task}", responses=error_responses(400, 401, 403, 404, 503))
    async def delete(task: str, caller: Caller = Depends(auth.caller)) -> TaskDeleted:
        await engine.unregister_adapter(name(caller, task))
        return TaskDeleted(task=task, deleted=True)

    return router


async def _read_bounded(file: UploadFile, max_bytes: int) -> bytes:
    """Read an upload in chunks and stop as soon as it passes the limit (never hold more)."""
    chunks, total = [], 0
    while chunk := await file.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLargeError(f"uploads are limited to {max_bytes} bytes; this one is larger")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    if len(data) < 10 or data[8:9] != b"{":
        return False
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return False
    try:
        json.loads(data[8:8 + size])
    except ValueError:
        return False
    except RecursionError:  # a header nested too deeply: decode_artifact says so as a 400
        return True
    return True
