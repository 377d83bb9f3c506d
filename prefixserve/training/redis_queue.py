"""RedisJobQueue: the job queue shared by workers on many machines, a Redis Stream with a consumer group.

Keys (ns = namespace, the same one the RedisStore uses):
    {ns}:jobs:stream          one entry {"job": id} per delivery; consumer group "workers"
    {ns}:job:{id}             hash: record (JSON JobRecord), spec (JSON JobSpec); expires after retention
    {ns}:jobs:active          set of the ids of queued and running jobs (the max_pending bound)
    {ns}:jobs:tenant:{name}   sorted set of the tenant's job ids by creation time

A worker takes new entries with XREADGROUP; an entry idle in the pending list longer than the
visibility timeout belongs to a dead worker and is taken over with XAUTOCLAIM. A live worker resets its
entry's idle time by XCLAIMing it to itself (JUSTID) on every heartbeat. Finishing a job XACKs and
XDELs its entry. Every record change is a WATCH/MULTI/EXEC transaction on the job's hash that first
checks the claim's attempt (the fence), so a worker whose job was taken over cannot write. Redis
failures surface as StoreUnavailableError naming the URL and the operation."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import redis
from redis.exceptions import RedisError, ResponseError, WatchError

from prefixserve.adapters_store.redis_store import client_options, redact_url
from prefixserve.errors import ConfigError, StoreUnavailableError, TrainingDataError
from prefixserve.training.queue import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_PENDING,
    DEFAULT_RETENTION_S,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    Claim,
    JobQueue,
    JobRecord,
    JobStatus,
    check_fence,
    check_job_id,
    check_limit,
    dumps,
    error_dict,
    new_record,
    not_found,
    overloaded,
    start_attempt,
)
from prefixserve.training.spec import JobSpec, parse_job_spec

GROUP = "workers"
_MAX_BLOCK_S = 1.0  # one XREADGROUP blocks at most this long (below the socket timeout), then re-claims are checked
_MAX_WATCH_ATTEMPTS = 50


class RedisJobQueue(JobQueue):
    def __init__(self, url: str, *, namespace: str = "prefixserve",
                 visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S, max_pending: int = DEFAULT_MAX_PENDING,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, retention_s: float = DEFAULT_RETENTION_S,
                 socket_timeout: float = 5.0):
        super().__init__(visibility_timeout_s=visibility_timeout_s, max_pending=max_pending,
                         max_attempts=max_attempts, retention_s=retention_s)
        if not namespace or not isinstance(namespace, str):
            raise ConfigError(f"expected a non-empty Redis namespace, found {namespace!r}")
        self.url, self.namespace = redact_url(url), namespace
        self._stream, self._active = f"{namespace}:jobs:stream", f"{namespace}:jobs:active"
        try:
            self._client = redis.Redis.from_url(url, **client_options(socket_timeout, retries=1))
        except ValueError as e:
            raise ConfigError(f"expected a redis:// or rediss:// URL, found {self.url!r} ({e})") from None
        with self._unavailable("create the consumer group"):
            self._ensure_group()

    def submit(self, spec: JobSpec, tenant: str) -> JobRecord:
        record = new_record(spec, tenant)
        key, tenant_key = self._job_key(record.id), self._tenant_key(tenant)

        def change(pipe) -> None:
            if pipe.exists(key):
                return  # the EXEC of a previous try committed before the connection broke
            if pipe.scard(self._active) >= self.max_pending:
                raise overloaded(self.max_pending)
            pipe.multi()
            pipe.hset(key, mapping={"record": dumps(record.to_dict()), "spec": dumps(spec.to_dict())})
            pipe.sadd(self._active, record.id)
            pipe.zadd(tenant_key, {record.id: record.created_at})
            pipe.zremrangebyscore(tenant_key, "-inf", record.created_at - 2 * self.retention_s)
            pipe.xadd(self._stream, {"job": record.id})

        self._transaction("submit", [self._active, key], change)
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._unavailable("get"):
            raw = self._client.hget(self._job_key(check_job_id(job_id)), "record")
        if raw is None:
            raise not_found(job_id)
        return JobRecord.from_dict(json.loads(raw))

    def list_jobs(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        tenant_key = self._tenant_key(tenant)
        with self._unavailable("list_jobs"):
            job_ids = [i.decode() for i in self._client.zrevrange(tenant_key, 0, check_limit(limit) - 1)]
            with self._client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self._job_key(job_id), "record")
                raws = pipe.execute()
            expired = [job_id for job_id, raw in zip(job_ids, raws) if raw is None]
            if expired:
                self._client.zrem(tenant_key, *expired)
        return [JobRecord.from_dict(json.loads(raw)) for raw in raws if raw is not None]

    def claim(self, worker_id: str, block_s: float = 0.0) -> Claim | None:
        deadline = time.monotonic() + block_s
        while True:
            with self._unavailable("claim"):
                entry = self._take_expired(worker_id) or self._take_new(worker_id, deadline)
            if entry is not None:
                claim = self._start(worker_id, *entry)
                if claim is not None:
                    return claim
            elif time.monotonic() >= deadline:
                return None

    def release(self, claim: Claim) -> None:
        def change(pipe) -> None:
            record = check_fence(_record(pipe.hget(self._job_key(claim.job_id), "record")), claim)
            record = replace(record, status=JobStatus.QUEUED, attempts=record.attempts - 1)
            pipe.multi()
            pipe.hset(self._job_key(claim.job_id), "record", dumps(record.to_dict()))
            self._remove_entry(pipe, claim.message_id)
            pipe.xadd(self._stream, {"job": claim.job_id})  # a fresh entry: deliverable at once

        self._transaction("release", [self._job_key(claim.job_id)], change)

    def close(self) -> None:
        self._client.close()

    # --- internals ---

    def _take_expired(self, worker_id: str) -> tuple[str, dict | None] | None:
        """The first pending entry idle longer than the visibility timeout, now owned by `worker_id`."""
        start = "0-0"
        while True:
            next_start, entries, *_ = self._client.xautoclaim(
                self._stream, GROUP, worker_id, min_idle_time=int(self.visibility_timeout_s * 1000),
                start_id=start, count=1)
            if entries:
                return _entry(entries[0])
            if _text(next_start) == "0-0":
                return None
            start = next_start

    def _take_new(self, worker_id: str, deadline: float) -> tuple[str, dict | None] | None:
        block_ms = int(min(max(0.0, deadline - time.monotonic()), _MAX_BLOCK_S) * 1000)
        try:
            # block=None: return at once (BLOCK 0 would wait forever)
            response = self._client.xreadgroup(GROUP, worker_id, {self._stream: ">"}, count=1, block=block_ms or None)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group()  # Redis lost its data (restart without persistence): start over
            return None
        if not response:
            return None
        entries = response[0][1]  # [[stream, [(id, fields)]]]
        return _entry(entries[0]) if entries else None

    def _start(self, worker_id: str, message_id: str, fields: dict | None) -> Claim | None:
        """Begin the next attempt of the entry's job; None (entry removed) if it is gone, finished, or has
        now run out of attempts."""
        job_id = _text(fields.get(b"job", b"")) if fields else ""
        key = self._job_key(job_id)
        claim: Claim | None = None

        def change(pipe) -> None:
            nonlocal claim
            claim = None
            raw_record, raw_spec = pipe.hmget(key, "record", "spec")
            record = _record(raw_record)
            pipe.multi()
            if record is None or record.status.finished:
                self._remove_entry(pipe, message_id)
                return
            record, spec = start_attempt(record, worker_id, self.max_attempts), None
            if record.status == JobStatus.RUNNING:
                try:
                    spec = parse_job_spec(json.loads(raw_spec))
                except TrainingDataError as e:  # written by an older, laxer version: fail it, not the worker
                    record = replace(record, status=JobStatus.FAILED, finished_at=time.time(), error=error_dict(e))
            pipe.hset(key, "record", dumps(record.to_dict()))
            if record.status.finished:
                self._finish(pipe, record.id, message_id)
            else:
                claim = Claim(job_id=job_id, spec=spec, attempt=record.attempts, worker_id=worker_id,
                              record=record, message_id=message_id)

        self._transaction("claim", [key], change)
        return claim

    def _update(self, claim: Claim, change: Callable[[JobRecord], JobRecord] | None, *, finish: bool) -> None:
        key = self._job_key(claim.job_id)

        def write(pipe) -> None:
            record = check_fence(_record(pipe.hget(key, "record")), claim)
            pipe.multi()
            if change is not None:
                pipe.hset(key, "record", dumps(change(record).to_dict()))
            if finish:
                self._finish(pipe, claim.job_id, claim.message_id)
            else:  # renew the lease: XCLAIM resets the entry's idle time
                pipe.xclaim(self._stream, GROUP, claim.worker_id, 0, [claim.message_id], justid=True)

        self._transaction("update", [key], write)

    def _finish(self, pipe, job_id: str, message_id: str) -> None:
        pipe.srem(self._active, job_id)
        pipe.expire(self._job_key(job_id), int(self.retention_s))
        self._remove_entry(pipe, message_id)

    def _remove_entry(self, pipe, message_id: str | None) -> None:
        if message_id is not None:
            pipe.xack(self._stream, GROUP, message_id)
            pipe.xdel(self._stream, message_id)

    def _transaction(self, operation: str, keys: list[str], change: Callable) -> None:
        """WATCH keys, `change(pipe)` reads then queues writes after pipe.multi(); retried on conflict."""
        with self._unavailable(operation), self._client.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_ATTEMPTS):
                try:
                    pipe.watch(*keys)
                    change(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    return
                except WatchError:
                    pipe.reset()
        raise StoreUnavailableError(f"{operation} on the job queue at {self.url}: expected to commit within "
                                    f"{_MAX_WATCH_ATTEMPTS} attempts, found the job changed by others every time")

    def _ensure_group(self) -> None:
        try:
            self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _job_key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.namespace}:jobs:tenant:{tenant}"

    @contextlib.contextmanager
    def _unavailable(self, operation: str) -> Iterator[None]:
        try:
            yield
        except RedisError as e:
            raise StoreUnavailableError(f"Redis job queue at {self.url} failed during {operation}: "
                                        f"{type(e).__name__}: {e}") from e


def _record(raw: bytes | None) -> JobRecord | None:
    return None if raw is None else JobRecord.from_dict(json.loads(raw))


def _entry(entry) -> tuple[str, dict | None]:
    message_id, fields = entry
    return _text(message_id), fields


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
