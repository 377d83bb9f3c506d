"""Tenants, their API keys (stored as sha256 digests only) and limits, in a JSON file or in Redis.

A key is shown once, when it is made; the registry keeps its digest. Keys are 256-bit random
tokens, so a plain sha256 is the right hash (nothing to brute-force, unlike passwords), and the
lookup goes by digest: how long it takes depends on the digest of what was sent, which an attacker
cannot steer toward a real key's, never on how much of a real key was guessed."""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefixserve.errors import InvalidRequestError, PrefixServeError, StoreUnavailableError

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEY_PREFIX = "psk_"
MAX_KEYS_PER_TENANT = 64
_MAX_WATCH_RETRIES = 16


@dataclass(frozen=True)
class TenantLimits:
    """None = unlimited. Rates are metered per replica, or across all replicas when they share a Redis."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None  # prompt + generated tokens
    max_concurrent: int | None = None
    max_tasks: int | None = None
    max_task_bytes: int | None = None  # distinct versions the tenant's task histories retain, in bytes

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"expected limits.{name} to be a positive integer or null, found {value!r}")


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0  # share of the engine relative to other tenants while all are busy
    limits: TenantLimits = field(default_factory=TenantLimits)
    keys: dict[str, str] = field(default_factory=dict)  # key id -> sha256 hex digest of the key

    def __post_init__(self):
        check_tenant_name(self.name)
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not (
                math.isfinite(self.weight) and 0 < self.weight <= 1000):
            raise InvalidRequestError(f"expected weight in (0, 1000], found {self.weight!r}")

    def public(self) -> dict:
        """What the admin API shows: never a digest, only key ids."""
        return {"name": self.name, "weight": self.weight, "limits": asdict(self.limits),
                "key_ids": sorted(self.keys)}

    @classmethod
    def from_json(cls, name: str, data: dict) -> Tenant:
        return cls(name=name, weight=data.get("weight", 1.0), limits=TenantLimits(**data.get("limits", {})),
                   keys=dict(data.get("keys", {})))

    def to_json(self) -> dict:
        return {"weight": self.weight, "limits": asdict(self.limits), "keys": self.keys}


def check_tenant_name(name: object) -> str:
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
        raise InvalidRequestError(f"expected a tenant name of 1..64 letters, digits, '_', '.' or '-' (starting with "
                                  f"a letter or digit), found {name!r:.80}")
    return name


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key id, key, digest). The id is public (listed, used to revoke); the key is shown once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_digest(key)
    return digest[:12], key, digest


class TenantRegistry(abc.ABC):
    """Where tenants live. Changes made through one replica are seen by the others (file: on the
    next lookup, by modification time; Redis: immediately)."""

    @abc.abstractmethod
    def tenant_for_digest(self, digest: str) -> Tenant | None: ...

    @abc.abstractmethod
    def get(self, name: str) -> Tenant | None: ...

    @abc.abstractmethod
    def list(self) -> list[Tenant]: ...

    @abc.abstractmethod
    def _write(self, name: str, tenant: Tenant | None, expect_exists: bool | None) -> None:
        """Atomically store (None: delete) a tenant; `expect_exists` guards create/update races."""

    def has_keys(self) -> bool:
        return any(t.keys for t in self.list())

    def create(self, name: str, weight: float = 1.0, limits: TenantLimits | None = None) -> Tenant:
        tenant = Tenant(name, weight, limits or TenantLimits())
        self._write(name, tenant, expect_exists=False)
        return tenant

    def update(self, name: str, weight: float | None = None, limits: TenantLimits | None = None) -> Tenant:
        tenant = self.require(name)
        tenant = replace(tenant, weight=tenant.weight if weight is None else weight,
                         limits=tenant.limits if limits is None else limits)
        self._write(name, tenant, expect_exists=True)
        return tenant

    def delete(self, name: str) -> None:
        self.require(name)
        self._write(name, None, expect_exists=True)

    def add_key(self, name: str) -> tuple[str, str]:
        """A new key for the tenant: (key id, key). The key is not stored and cannot be shown again."""
        tenant = self.require(name)
        if len(tenant.keys) >= MAX_KEYS_PER_TENANT:
            raise InvalidRequestError(f"expected at most {MAX_KEYS_PER_TENANT} keys per tenant, found "
                                      f"{len(tenant.keys)}; revoke one first")
        key_id, key, digest = new_key()
        self._write(name, replace(tenant, keys={**tenant.keys, key_id: digest}), expect_exists=True)
        return key_id, key

    def revoke_key(self, name: str, key_id: str) -> None:
        tenant = self.require(name)
        if key_id not in tenant.keys:
            raise TenantNotFoundError(f"tenant {name!r} has no key {key_id!r}")
        self._write(name, replace(tenant, keys={k: v for k, v in tenant.keys.items() if k != key_id}),
                    expect_exists=True)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def require(self, name: str) -> Tenant:
        tenant = self.get(check_tenant_name(name))
        if tenant is None:
            raise TenantNotFoundError(f"expected an existing tenant, found no tenant {name!r}")
        return tenant


class TenantNotFoundError(PrefixServeError):
    status_code = 404
    code = "tenant_not_found"


class TenantExistsError(PrefixServeError):
    status_code = 409
    code = "tenant_exists"


def _check_expectation(name: str, exists: bool, expect_exists: bool | None) -> None:
    if expect_exists is False and exists:
        raise TenantExistsError(f"tenant {name!r} already exists")
    if expect_exists is True and not exists:
        raise TenantNotFoundError(f"expected an existing tenant, found no tenant {name!r}")


class FileTenantRegistry(TenantRegistry):
    """A JSON file {"tenants": {name: {weight, limits, keys}}}; written whole (temp + rename) under
    an flock, re-read when its modification time changes (another process or an operator edited it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tenants: dict[str, Tenant] = {}
        self._by_digest: dict[str, str] = {}
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._save({})
        self._reload()

    def tenant_for_digest(self, digest: str) -> Tenant | None:
        self._reload()
        name = self._by_digest.get(digest)
        return self._tenants.get(name) if name else None

    def get(self, name: str) -> Tenant | None:
        self._reload()
        return self._tenants.get(name)

    def list(self) -> list[Tenant]:
        self._reload()
        return [self._tenants[n] for n in sorted(self._tenants)]

    def _write(self, name: str, tenant: Tenant | None, expect_exists: bool | None) -> None:
        with open(self.path.with_suffix(".lock"), "a") as lock, self._lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tenants = self._read()
            _check_expectation(name, name in tenants, expect_exists)
            if tenant is None:
                tenants.pop(name)
            else:
                tenants[name] = tenant
            self._save(tenants)
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise StoreUnavailableError(f"the tenants file {str(self.path)!r} cannot be read: {exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            tenants = self._read()
            self._tenants = tenants
            self._by_digest = {d: t.name for t in tenants.values() for d in t.keys.values()}
            self._stamp = stamp

    def _read(self) -> dict[str, Tenant]:
        try:
            data = json.loads(self.path.read_text())
            return {name: Tenant.from_json(name, entry) for name, entry in data["tenants"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidRequestError) as exc:
            raise StoreUnavailableError(f"expected the tenants file {str(self.path)!r} to hold "
                                        f'{{"tenants": {{name: {{weight, limits, keys}}}}}}, found an error: {exc}'
                                        ) from exc

    def _save(self, tenants: dict[str, Tenant]) -> None:
        data = json.dumps({"tenants": {n: t.to_json() for n, t in sorted(tenants.items())}}, indent=2)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o600)  # digests only, but nobody else needs to read them
        os.replace(temp, self.path)


class RedisTenantRegistry(TenantRegistry):
    """Tenants as JSON in one hash, digests -> tenant name in another; updated in MULTI/EXEC."""

    def __init__(self, url: str, namespace: str = "prefixserve", socket_timeout: float = 2.0):
        import redis

        from prefixserve.adapters_store.redis_store import client_options

        self._redis = redis.Redis.from_url(url, **client_options(socket_timeout, retries=1))
        self._tenants_key, self._digests_key = f"{namespace}:tenants", f"{namespace}:tenant_keys"
        self._errors = (redis.RedisError, OSError)

    def tenant_for_digest(self, digest: str) -> Tenant | None:
        with self._unavailable():
            name = self._redis.hget(self._digests_key, digest)
        return self.get(name.decode()) if name else None

    def get(self, name: str) -> Tenant | None:
        with self._unavailable():
            raw = self._redis.hget(self._tenants_key, name)
        return Tenant.from_json(name, json.loads(raw)) if raw else None

    def list(self) -> list[Tenant]:
        with self._unavailable():
            raw = self._redis.hgetall(self._tenants_key)
        return [Tenant.from_json(n.decode(), json.loads(v)) for n, v in sorted(raw.items())]

    def _write(self, name: str, tenant: Tenant | None, expect_exists: bool | None) -> None:
        import redis

        with self._unavailable(), self._redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(self._tenants_key)
                    raw = pipe.hget(self._tenants_key, name)
                    _check_expectation(name, raw is not None, expect_exists)
                    old_digests = list(json.loads(raw).get("keys", {}).values()) if raw else []
                    pipe.multi()
                    if old_digests:
                        pipe.hdel(self._digests_key, *old_digests)
                    if tenant is None:
                        pipe.hdel(self._tenants_key, name)
                    else:
                        pipe.hset(self._tenants_key, name, json.dumps(tenant.to_json()))
                        if tenant.keys:
                            pipe.hset(self._digests_key, mapping={d: name for d in tenant.keys.values()})
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # another replica changed tenants meanwhile: read again
            raise StoreUnavailableError(f"tenant {name!r} kept changing under {_MAX_WATCH_RETRIES} attempts to "
                                        f"update it; try again")

    def close(self) -> None:
        self._redis.close()

    @contextlib.contextmanager
    def _unavailable(self):
        try:
            yield
        except self._errors as exc:
            raise StoreUnavailableError(f"the tenant registry (Redis) is unreachable: {exc}") from exc
