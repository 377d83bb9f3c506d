"""The admin API (admin key only): tenants, their weights and limits, and their API keys."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from prefixserve.errors import NotAvailableError
from prefixserve.server.auth import Authenticator, admin
from prefixserve.server.protocol import error_responses
from prefixserve.server.tenants import TenantLimits, TenantRegistry


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_min: int | None = Field(default=None, ge=1)
    tokens_per_min: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_tasks: int | None = Field(default=None, ge=1)
    max_task_bytes: int | None = Field(default=None, ge=1)


class TenantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(default=1.0, gt=0, le=1000)
    limits: LimitsBody = Field(default_factory=LimitsBody)


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float | None = Field(default=None, gt=0, le=1000)
    limits: LimitsBody | None = None


class TenantOut(BaseModel):
    name: str
    weight: float
    limits: LimitsBody
    key_ids: list[str]


class NewKey(BaseModel):
    tenant: str
    key_id: str
    key: str  # shown once: only its digest is kept


def admin_router(auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)],
                       responses=error_responses(400, 401, 403, 404, 409, 501, 503))

    def registry() -> TenantRegistry:
        if auth.registry is None:
            raise NotAvailableError("no tenant registry is configured (--tenants-file, or --tenants-redis with a "
                                    "Redis URL)")
        return auth.registry

    @router.get("/tenants")
    async def list_tenants() -> dict[str, list[TenantOut]]:
        tenants = await asyncio.to_thread(registry().list)
        return {"tenants": [TenantOut(**t.public()) for t in tenants]}

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: TenantBody) -> TenantOut:
        limits = TenantLimits(**body.limits.model_dump())
        tenant = await asyncio.to_thread(registry().create, body.name, body.weight, limits)
        return TenantOut(**tenant.public())

    @router.get("/tenants/{name}")
    async def show_tenant(name: str) -> TenantOut:
        reg = registry()
        tenant = await asyncio.to_thread(reg.require, name)
        return TenantOut(**tenant.public())

    @router.patch("/tenants/{name}")
    async def update_tenant(name: str, body: TenantUpdate) -> TenantOut:
        limits = TenantLimits(**body.limits.model_dump()) if body.limits is not None else None
        tenant = await asyncio.to_thread(registry().update, name, body.weight, limits)
        return TenantOut(**tenant.public())

    @router.delete("/tenants/{name}")
    async def delete_tenant(name: str) -> dict:
        """Removes the tenant and its keys; its tasks stay in the store (delete them first if wanted)."""
        await asyncio.to_thread(registry().delete, name)
        return {"tenant": name, "deleted": True}

    @router.post("/tenants/{name}/keys", status_code=201)
    async def create_key(name: str) -> NewKey:
        key_id, key = await asyncio.to_thread(registry().add_key, name)
        return NewKey(tenant=name, key_id=key_id, key=key)

    @router.delete("/tenants/{name}/keys/{key_id}")
    async def revoke_key(name: str, key_id: str) -> dict:
        await asyncio.to_thread(registry().revoke_key, name, key_id)
        return {"tenant": name, "key_id": key_id, "revoked": True}

    return router
