"""Tasks over HTTP: upload (a prefixserve artifact or a PEFT folder archived as .tar/.tar.gz/.zip),
list, show, roll back, delete. Every change goes through the engine thread, so the uploading
replica serves the new version from its next request; other replicas hear it from the store."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, File, UploadFile
from pydantic import BaseModel

from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.errors import PayloadTooLargeError, TaskNotFoundError
from prefixserve.server.tenancy import DEFAULT_TENANT, tenant_task, tenant_tasks

_CHUNK = 1 << 20


class RollbackBody(BaseModel):
    version: str | None = None  # None: the version before the current one


def tasks_router(engine: AsyncEngine) -> APIRouter:
    router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
    sync = engine.engine
    limits = sync.config.adapters

    def name(task: str) -> str:
        engine_task = tenant_task(DEFAULT_TENANT, task, sync.backbone.name)
        if engine_task is None:
            raise TaskNotFoundError(f"{task!r} is the plain backbone, not a task")
        return engine_task

    @router.put("/{task}", status_code=201)
    async def upload(task: str, file: UploadFile = File(...)) -> dict:
        engine_task = name(task)
        data = await _read_bounded(file, limits.max_artifact_bytes)
        if not _is_safetensors(data):  # a PEFT adapter archive: convert it (CPU work, off the event loop)
            data = await asyncio.to_thread(import_peft, data, arch=sync.backbone.arch,
                                           fingerprint=sync.adapters.fingerprint, limits=limits)
        artifact = await engine.register_adapter(engine_task, data)
        return {"task": task, "kind": artifact.kind, "version": artifact.version, "num_bytes": artifact.num_bytes}

    @router.get("")
    async def list_tasks() -> dict:
        current = await asyncio.to_thread(sync.store.list_tasks, f"{DEFAULT_TENANT}/")
        return {"tasks": [{"task": t, "version": current[f"{DEFAULT_TENANT}/{t}"]}
                          for t in tenant_tasks(DEFAULT_TENANT, current)]}

    @router.get("/{task}")
    async def show(task: str) -> dict:
        engine_task = name(task)
        history = await asyncio.to_thread(sync.store.history, engine_task)
        if not history:
            raise TaskNotFoundError(f"task {task!r} is not registered")
        current = history[0]
        return {"task": task, "kind": current.kind, "version": current.version, "num_bytes": current.num_bytes,
                "residency": sync.adapters.residency(current.version),
                "history": [{"version": r.version, "kind": r.kind, "num_bytes": r.num_bytes,
                             "created_at": r.created_at} for r in history]}

    @router.post("/{task}/rollback")
    async def rollback(task: str, body: RollbackBody | None = None) -> dict:
        engine_task = name(task)
        version = await engine.call(lambda e: e.rollback_adapter(engine_task, body.version if body else None))
        return {"task": task, "version": version}

    @router.delete("/{task}")
    async def delete(task: str) -> dict:
        await engine.unregister_adapter(name(task))
        return {"task": task, "deleted": True}

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
    return True
