"""Who is calling: `Authorization: Bearer <key>` -> a tenant, or the admin.

Authentication is on when a tenant registry or an admin key is configured. Without either (the
embedded default) the server only listens on loopback (the CLI refuses anything else) and every
caller is tenant `default`. /metrics takes the admin key or a metrics key (a scraper's, good for
nothing else); it is open only while neither API keys nor a metrics key are configured."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from fastapi import Request

from prefixserve.engine.tenancy import DEFAULT_TENANT
from prefixserve.errors import ForbiddenError, UnauthorizedError
from prefixserve.server.tenants import TenantLimits, TenantRegistry, key_digest

MAX_KEY_CHARS = 512


@dataclass(frozen=True)
class Caller:
    tenant: str
    weight: float = 1.0
    limits: TenantLimits = field(default_factory=TenantLimits)
    is_admin: bool = False


ANONYMOUS = Caller(DEFAULT_TENANT)
ADMIN = Caller("", is_admin=True)


class Authenticator:
    def __init__(self, registry: TenantRegistry | None = None, admin_key: str | None = None,
                 metrics_key: str | None = None):
        """`metrics_key` reads /metrics and nothing else; it does not turn API keys on by itself."""
        self.registry = registry
        # Kept as digests and compared digest to digest in constant time.
        self._admin_digest = key_digest(admin_key) if admin_key else None
        self._metrics_digest = key_digest(metrics_key) if metrics_key else None

    @property
    def enabled(self) -> bool:
        return self.registry is not None or self._admin_digest is not None

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller for an Authorization header; UnauthorizedError for a missing or unknown key.
        The message is the same for every unknown key (it never says what exists)."""
        if not self.enabled:
            return ANONYMOUS
        return self._caller_for(_bearer_digest(authorization))

    @property
    def guards_metrics(self) -> bool:
        return self.enabled or self._metrics_digest is not None

    def authorize_metrics(self, authorization: str | None) -> None:
        """/metrics names every tenant's tasks: only the metrics key or the admin key may read it
        (ForbiddenError for a tenant's key, UnauthorizedError for a missing or unknown one)."""
        if not self.guards_metrics:
            return
        digest = _bearer_digest(authorization)
        if self._metrics_digest is not None and hmac.compare_digest(digest, self._metrics_digest):
            return
        if not self._caller_for(digest).is_admin:
            raise ForbiddenError("expected the admin key or the metrics key (--metrics-key) for /metrics, found "
                                 "a tenant's key")

    def _caller_for(self, digest: str) -> Caller:
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return ADMIN
        tenant = self.registry.tenant_for_digest(digest) if self.registry is not None else None
        if tenant is None:
            raise UnauthorizedError("the API key is not valid")
        return Caller(tenant.name, tenant.weight, tenant.limits)


def _bearer_digest(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
        raise UnauthorizedError("expected an 'Authorization: Bearer <API key>' header, found "
                                + ("none" if not authorization else "another form"))
    return key_digest(key)


async def caller(request: Request) -> Caller:
    """FastAPI dependency: the authenticated tenant of a request (admin keys are refused here)."""
    found = await _authenticate(request)
    if found.is_admin:
        raise ForbiddenError("the admin key manages tenants (/v1/admin/...); use a tenant's API key for tasks "
                             "and generation")
    return found


async def admin(request: Request) -> Caller:
    """FastAPI dependency for /v1/admin: only the admin key."""
    if not request.app.state.auth.enabled:
        raise ForbiddenError("API keys are off on this server (every caller is tenant 'default'); start it with "
                             "--admin-key (PREFIXSERVE_ADMIN_KEY) to manage tenants")
    found = await _authenticate(request)
    if not found.is_admin:
        raise ForbiddenError("expected the admin key for /v1/admin, found a tenant's key")
    return found


async def metrics_reader(request: Request) -> None:
    """FastAPI dependency for /metrics: the metrics or admin key; open while no key is configured."""
    auth: Authenticator = request.app.state.auth
    if auth.guards_metrics:
        await asyncio.to_thread(auth.authorize_metrics, request.headers.get("authorization"))


async def _authenticate(request: Request) -> Caller:
    auth: Authenticator = request.app.state.auth
    if not auth.enabled:
        return ANONYMOUS
    # A Redis-backed registry is a network round trip: keep it off the event loop.
    return await asyncio.to_thread(auth.authenticate, request.headers.get("authorization"))
