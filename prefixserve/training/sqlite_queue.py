"""SqliteJobQueue: the embedded job queue, one SQLite file (WAL), shared by processes on one machine.

    jobs(seq, id, tenant, status, attempt, lease_until, record JSON, spec JSON)

`status`, `attempt` and `lease_until` duplicate the JSON record's fields so claims can select on
them. Every change is one BEGIN IMMEDIATE transaction (SQLite's writer lock), so a claim's select +
update is atomic across processes: two workers never get the same live job. Leases are wall-clock
times (`lease_until`), so the workers sharing a file must share a clock, i.e. a machine."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from prefixserve.errors import TrainingDataError
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

_POLL_S = 0.2  # how often a blocked claim looks again (SQLite has no notifications)
_BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    finished_at REAL,
    record TEXT NOT NULL,
    spec TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq);
"""


class SqliteJobQueue(JobQueue):
    def __init__(self, path: str | Path, *, visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
                 max_pending: int = DEFAULT_MAX_PENDING, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 retention_s: float = DEFAULT_RETENTION_S):
        super().__init__(visibility_timeout_s=visibility_timeout_s, max_pending=max_pending,
                         max_attempts=max_attempts, retention_s=retention_s)
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, shared by the worker and its heartbeat thread under a lock; autocommit mode so
        # transactions are exactly the BEGIN IMMEDIATE ... COMMIT blocks below.
        self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed claim/completion survives power loss
            self._db.executescript(_SCHEMA)

    def submit(self, spec: JobSpec, tenant: str) -> JobRecord:
        record = new_record(spec, tenant)
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE finished_at < ?", (time.time() - self.retention_s,))
            (num_pending,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)",
                                        (JobStatus.QUEUED, JobStatus.RUNNING)).fetchone()
            if num_pending >= self.max_pending:
                raise overloaded(self.max_pending)
            db.execute("INSERT INTO jobs (id, tenant, status, record, spec) VALUES (?, ?, ?, ?, ?)",
                       (record.id, tenant, record.status, dumps(record.to_dict()), dumps(spec.to_dict())))
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (check_job_id(job_id),)).fetchone()
        if row is None:
            raise not_found(job_id)
        return JobRecord.from_dict(json.loads(row[0]))

    def list_jobs(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM jobs WHERE tenant = ? ORDER BY seq DESC LIMIT ?",
                                    (tenant, check_limit(limit))).fetchall()
        return [JobRecord.from_dict(json.loads(row[0])) for row in rows]

    def claim(self, worker_id: str, block_s: float = 0.0) -> Claim | None:
        deadline = time.monotonic() + block_s
        while True:
            claim = self._claim_once(worker_id)
            if claim is not None or time.monotonic() >= deadline:
                return claim
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    def release(self, claim: Claim) -> None:
        with self._transaction() as db:
            record = check_fence(self._record(db, claim.job_id), claim)
            record = replace(record, status=JobStatus.QUEUED, attempts=record.attempts - 1)
            db.execute("UPDATE jobs SET status = ?, attempt = ?, lease_until = NULL, record = ? WHERE id = ?",
                       (record.status, record.attempts, dumps(record.to_dict()), claim.job_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- internals ---

    def _claim_once(self, worker_id: str) -> Claim | None:
        while True:
            with self._transaction() as db:
                row = db.execute("SELECT record, spec FROM jobs WHERE status = ? OR (status = ? AND lease_until < ?) "
                                 "ORDER BY seq LIMIT 1", (JobStatus.QUEUED, JobStatus.RUNNING, time.time())).fetchone()
                if row is None:
                    return None
                record = start_attempt(JobRecord.from_dict(json.loads(row[0])), worker_id, self.max_attempts)
                spec = None
                if record.status == JobStatus.RUNNING:
                    try:
                        spec = parse_job_spec(json.loads(row[1]))
                    except TrainingDataError as e:  # written by an older, laxer version: fail it, not the worker
                        record = replace(record, status=JobStatus.FAILED, finished_at=time.time(), error=error_dict(e))
                self._write(db, record)
            if spec is not None:
                return Claim(job_id=record.id, spec=spec, attempt=record.attempts, worker_id=worker_id, record=record)

    def _update(self, claim: Claim, change: Callable[[JobRecord], JobRecord] | None, *, finish: bool) -> None:
        with self._transaction() as db:
            record = check_fence(self._record(db, claim.job_id), claim)
            self._write(db, change(record) if change is not None else record)

    def _write(self, db: sqlite3.Connection, record: JobRecord) -> None:
        lease_until = time.time() + self.visibility_timeout_s if record.status == JobStatus.RUNNING else None
        db.execute("UPDATE jobs SET status = ?, attempt = ?, lease_until = ?, finished_at = ?, record = ? WHERE id = ?",
                   (record.status, record.attempts, lease_until, record.finished_at, dumps(record.to_dict()),
                    record.id))

    @staticmethod
    def _record(db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_dict(json.loads(row[0]))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
