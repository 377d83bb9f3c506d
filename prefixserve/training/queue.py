"""The training job queue interface: jobs, claims with leases, and the record the API shows.

A job goes queued -> running -> succeeded | failed. A worker `claim`s a job and holds it under a lease
of `visibility_timeout_s`, renewed by `renew`/`progress`/`publishing`; a job whose lease lapsed (its
worker died) is claimed again by another worker, with `attempts` + 1. The attempt number fences every
write: a worker whose job was re-claimed by another gets ClaimLostError and must stop, so only the
latest attempt can publish, complete or fail a job. After `max_attempts` claims the job fails instead
of killing workers forever.

Exactly-once publishing: the worker records `publishing(claim, version, metrics)` before it puts the
artifact into the store, and `complete`s after. An attempt that finds a pending version checks the
store (worker.py's `already_published`): if the put landed, it only completes; otherwise it trains again (resuming from
the checkpoint). Implementations: SqliteJobQueue (embedded, one file) and RedisJobQueue (a Stream with a
consumer group). Records, specs and progress are stored as JSON, never pickled."""

from __future__ import annotations

import abc
import enum
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

from prefixserve.errors import EngineOverloadedError, JobNotFoundError, PrefixServeError
from prefixserve.training.spec import JobSpec, ProgressEvent

DEFAULT_VISIBILITY_TIMEOUT_S = 60.0  # a dead worker's job is re-claimed this long after its last heartbeat
DEFAULT_MAX_PENDING = 1_000  # queued + running jobs, all tenants
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETENTION_S = 7 * 24 * 3600.0  # finished job records are kept this long
OVERLOADED_RETRY_AFTER_S = 30.0  # a job takes minutes; retrying a full queue sooner is pointless
MAX_LIST_LIMIT = 1_000
_JOB_ID_RE = re.compile(r"[0-9a-f]{32}")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ClaimLostError(PrefixServeError):
    """The job was re-claimed by another worker (this one's lease lapsed) or has finished meanwhile:
    this worker must stop working on it and publish nothing."""

    status_code = 409
    code = "claim_lost"


class AttemptsExhaustedError(PrefixServeError):
    """Every worker that claimed the job died or lost it; the job fails instead of killing workers forever."""

    status_code = 422
    code = "attempts_exhausted"


@dataclass(frozen=True)
class JobRecord:
    """What the API shows about a job. `task` is the engine task name the job publishes to."""

    id: str
    tenant: str
    task: str
    kind: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # claims so far; the current claim's attempt number fences its writes
    progress: dict | None = None  # the latest ProgressEvent as a dict
    metrics: dict | None = None
    version: str | None = None  # the published version (while running: the version being published)
    error: dict | None = None  # {"type": error code, "message": ...}
    publishing_at: float | None = None  # when the worker began publishing `version` (store clock of the worker)
    worker_id: str | None = None  # the worker holding (or that last held) the job

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, raw: dict) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known} | {"status": JobStatus(raw["status"])})


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one job, for one attempt."""

    job_id: str
    spec: JobSpec
    attempt: int
    worker_id: str
    record: JobRecord  # as of the claim: a pending `version` means an earlier attempt began publishing it
    message_id: str | None = None  # the Redis Stream entry, None for SQLite


class JobQueue(abc.ABC):
    """Bounded, durable, at-least-once job delivery with leases; see the module docstring."""

    def __init__(self, *, visibility_timeout_s: float, max_pending: int, max_attempts: int, retention_s: float):
        for name, value in (("visibility_timeout_s", visibility_timeout_s), ("max_pending", max_pending),
                            ("max_attempts", max_attempts), ("retention_s", retention_s)):
            if not value > 0:
                raise ValueError(f"expected {name} > 0, found {value!r}")
        self.visibility_timeout_s = float(visibility_timeout_s)
        self.max_pending = int(max_pending)
        self.max_attempts = int(max_attempts)
        self.retention_s = float(retention_s)

    @abc.abstractmethod
    def submit(self, spec: JobSpec, tenant: str) -> JobRecord:
        """Queue a job; EngineOverloadedError (with retry_after_s) when max_pending jobs are queued or running."""

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobNotFoundError if there is none (or it expired)."""

    @abc.abstractmethod
    def list_jobs(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        """The tenant's jobs, newest first."""

    @abc.abstractmethod
    def claim(self, worker_id: str, block_s: float = 0.0) -> Claim | None:
        """The oldest queued job, or a running one whose lease lapsed, now held by `worker_id`;
        None if none came within `block_s` seconds."""

    @abc.abstractmethod
    def release(self, claim: Claim) -> None:
        """Give the job back to the queue at once (a worker shutting down); the attempt does not count."""

    @abc.abstractmethod
    def _update(self, claim: Claim, change: Callable[[JobRecord], JobRecord] | None, *, finish: bool) -> None:
        """Atomically: ClaimLostError unless the job is running under `claim.attempt`; write `change(record)`;
        then renew the lease, or (finish) take the job off the queue for good."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def renew(self, claim: Claim) -> None:
        """Extend the claim's lease (the worker's heartbeat); ClaimLostError if it is no longer held."""
        self._update(claim, None, finish=False)

    def progress(self, claim: Claim, event: ProgressEvent) -> None:
        """Record the latest progress event and renew the lease."""
        self._update(claim, lambda r: replace(r, progress=asdict(event)), finish=False)

    def publishing(self, claim: Claim, version: str, metrics: dict) -> None:
        """Record that `version` is about to be put into the store (call before `store.put`)."""
        now = time.time()
        self._update(claim, lambda r: replace(r, version=version, metrics=metrics, publishing_at=now), finish=False)

    def complete(self, claim: Claim, version: str, metrics: dict) -> None:
        now = time.time()
        self._update(claim, lambda r: replace(r, status=JobStatus.SUCCEEDED, finished_at=now, version=version,
                                              metrics=metrics, error=None), finish=True)

    def fail(self, claim: Claim, error: PrefixServeError) -> None:
        """Finish the job as failed with the error's code and message; nothing is published."""
        now = time.time()
        self._update(claim, lambda r: replace(r, status=JobStatus.FAILED, finished_at=now, version=None,
                                              error=error_dict(error)), finish=True)


# --- helpers shared by the implementations ---

def new_record(spec: JobSpec, tenant: str) -> JobRecord:
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"expected a non-empty tenant name, found {tenant!r}")
    return JobRecord(id=uuid.uuid4().hex, tenant=tenant, task=spec.task, kind=spec.kind, status=JobStatus.QUEUED,
                     created_at=time.time())


def start_attempt(record: JobRecord, worker_id: str, max_attempts: int) -> JobRecord:
    """The record of a job being claimed: running under the next attempt, or failed if attempts ran out.
    A job with a pending version gets one attempt more, in which the worker only checks whether that
    version's put landed (then completes) and otherwise fails the job; it never trains again."""
    if record.attempts >= max_attempts + (record.version is not None):
        return replace(record, status=JobStatus.FAILED, finished_at=time.time(), version=None,
                       error=error_dict(attempts_exhausted(record, max_attempts)))
    return replace(record, status=JobStatus.RUNNING, attempts=record.attempts + 1,
                   started_at=record.started_at or time.time(), worker_id=worker_id)


def attempts_exhausted(record: JobRecord, max_attempts: int) -> AttemptsExhaustedError:
    return AttemptsExhaustedError(f"expected the job to finish within {max_attempts} attempts, found every worker "
                                  f"that ran it stopped without finishing (killed, out of memory or lost); last "
                                  f"worker {record.worker_id!r}")


def check_fence(record: JobRecord | None, claim: Claim) -> JobRecord:
    if record is None or record.status != JobStatus.RUNNING or record.attempts != claim.attempt:
        found = "no record" if record is None else f"status {record.status.value}, attempt {record.attempts}"
        raise ClaimLostError(f"expected job {claim.job_id} to be running under attempt {claim.attempt} of worker "
                             f"{claim.worker_id!r}, found {found}")
    return record


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise JobNotFoundError(f"expected a job id of 32 hex digits, found {job_id!r:.80}")
    return job_id


def check_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"expected a limit in 1..{MAX_LIST_LIMIT}, found {limit!r}")
    return limit


def not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(f"expected a training job with id {job_id}, found none")


def overloaded(max_pending: int) -> EngineOverloadedError:
    return EngineOverloadedError(f"expected fewer than {max_pending} training jobs queued or running, found "
                                 f"{max_pending}: retry later", retry_after_s=OVERLOADED_RETRY_AFTER_S)


def error_dict(error: PrefixServeError) -> dict:
    return {"type": error.code, "message": error.message}


def dumps(value: dict) -> str:
    """Strict JSON; a NaN or infinite number (a diverged loss) is written as null."""
    return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
