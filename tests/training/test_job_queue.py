"""The JobQueue contract, run against SqliteJobQueue and RedisJobQueue alike."""

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict

import pytest

from prefixserve.errors import EngineOverloadedError, JobNotFoundError, TrainingFailedError
from prefixserve.training.queue import ClaimLostError, JobQueue, JobStatus
from prefixserve.training.redis_queue import RedisJobQueue
from prefixserve.training.spec import ProgressEvent, parse_job_spec
from prefixserve.training.sqlite_queue import SqliteJobQueue

SHORT_LEASE_S = 0.5


def make_spec(task="default/sentiment", **extra):
    return parse_job_spec({"task": task, "kind": "prompt", "examples": [{"input": "good day", "output": "positive"}],
                           "hyperparameters": {"steps": 3, "targets": ["q_proj"]}, "seed": 7, **extra})


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request, tmp_path) -> Callable[..., JobQueue]:
    """Another client of the same queue (same file / same namespace) per call, closed afterwards."""
    queues = []
    if request.param == "sqlite":
        def make(**options):
            return SqliteJobQueue(tmp_path / "jobs.sqlite3", **options)
    else:
        url, namespace = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_namespace")

        def make(**options):
            return RedisJobQueue(url, namespace=namespace, **options)

    def tracked(**options):
        queues.append(make(**options))
        return queues[-1]
    yield tracked
    for queue in queues:
        queue.close()


def test_submit_get_and_list_per_tenant(make_queue):
    queue = make_queue()
    a_jobs = [queue.submit(make_spec(f"a/t{i}"), "a") for i in range(3)]
    b_job = queue.submit(make_spec("b/t"), "b")
    assert [r.id for r in queue.list_jobs("a")] == [r.id for r in reversed(a_jobs)]  # newest first
    assert [r.id for r in queue.list_jobs("a", limit=2)] == [a_jobs[2].id, a_jobs[1].id]
    assert [r.id for r in queue.list_jobs("b")] == [b_job.id]
    assert queue.list_jobs("nobody") == []
    record = queue.get(b_job.id)
    assert (record.tenant, record.task, record.kind, record.status, record.attempts) == ("b", "b/t", "prompt",
                                                                                         JobStatus.QUEUED, 0)
    body = json.loads(json.dumps(record.to_dict()))
    assert body["status"] == "queued" and body["id"] == b_job.id and body["progress"] is None


def test_claim_gives_the_spec_back_and_each_job_to_one_worker(make_queue):
    queue = make_queue()
    first, second = queue.submit(make_spec("a/one"), "a"), queue.submit(make_spec("a/two"), "a")
    claim = queue.claim("w1")
    assert (claim.job_id, claim.attempt, claim.worker_id) == (first.id, 1, "w1")
    assert claim.spec == make_spec("a/one")
    assert queue.claim("w2").job_id == second.id
    assert queue.claim("w3") is None
    record = queue.get(first.id)
    assert (record.status, record.attempts, record.worker_id) == (JobStatus.RUNNING, 1, "w1")
    assert record.started_at is not None


def test_concurrent_workers_never_share_a_job(make_queue):
    submitted = {make_queue().submit(make_spec(f"a/t{i}"), "a").id for i in range(8)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(worker_id):
        queue = make_queue()
        while (claim := queue.claim(worker_id)) is not None:
            with lock:
                claimed.append(claim.job_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(claimed) == sorted(submitted)


def test_blocking_claim_waits_for_a_job(make_queue):
    queue = make_queue()
    started = time.monotonic()
    assert queue.claim("w1", block_s=0.4) is None
    assert 0.35 <= time.monotonic() - started < 5
    timer = threading.Timer(0.3, lambda: make_queue().submit(make_spec(), "a"))
    timer.start()
    claim = queue.claim("w1", block_s=5)
    timer.join()
    assert claim is not None


def test_a_lapsed_lease_is_reclaimed_and_fences_the_old_worker(make_queue):
    queue = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    job = queue.submit(make_spec(), "a")
    old = queue.claim("w1")
    assert queue.claim("w2") is None  # the lease is live
    time.sleep(SHORT_LEASE_S + 0.2)
    new = make_queue(visibility_timeout_s=SHORT_LEASE_S).claim("w2")
    assert (new.job_id, new.attempt, new.worker_id) == (job.id, 2, "w2")
    assert queue.get(job.id).attempts == 2
    for write in (lambda: queue.progress(old, ProgressEvent(1, 3, 0.5)), lambda: queue.renew(old),
                  lambda: queue.publishing(old, "v" * 64, {}), lambda: queue.complete(old, "v" * 64, {}),
                  lambda: queue.fail(old, TrainingFailedError("x"))):
        with pytest.raises(ClaimLostError, match="attempt 1"):
            write()
    queue.complete(new, "a" * 64, {"exact_match": 1.0})
    assert queue.get(job.id).status == JobStatus.SUCCEEDED


def test_progress_renews_the_lease_and_is_readable(make_queue):
    queue = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    other = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    job = queue.submit(make_spec(), "a")
    claim = queue.claim("w1")
    for step in range(1, 5):
        time.sleep(SHORT_LEASE_S * 0.5)
        queue.progress(claim, ProgressEvent(step, 4, 1.0 / step, eta_s=4.0 - step, eval_metrics={"exact_match": 0.5}))
        assert other.claim("w2") is None
    time.sleep(SHORT_LEASE_S * 0.5)
    queue.renew(claim)
    assert other.claim("w2") is None
    progress = other.get(job.id).progress
    assert progress == asdict(ProgressEvent(4, 4, 0.25, eta_s=0.0, eval_metrics={"exact_match": 0.5}))


def test_a_nan_loss_is_stored_as_null(make_queue):
    queue = make_queue()
    job = queue.submit(make_spec(), "a")
    claim = queue.claim("w1")
    queue.progress(claim, ProgressEvent(2, 3, math.nan))
    assert queue.get(job.id).progress["loss"] is None


def test_publishing_then_complete(make_queue):
    queue = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    job = queue.submit(make_spec(), "a")
    claim = queue.claim("w1")
    version, metrics = "b" * 64, {"exact_match": 0.75, "eval_loss": 0.5}
    queue.publishing(claim, version, metrics)
    record = queue.get(job.id)
    assert (record.status, record.version, record.metrics) == (JobStatus.RUNNING, version, metrics)
    assert record.publishing_at is not None
    queue.complete(claim, version, metrics)
    record = queue.get(job.id)
    assert (record.status, record.version, record.metrics, record.error) == (JobStatus.SUCCEEDED, version, metrics,
                                                                             None)
    assert record.finished_at >= record.started_at >= record.created_at
    time.sleep(SHORT_LEASE_S + 0.2)
    assert queue.claim("w2") is None  # a finished job is never delivered again
    with pytest.raises(ClaimLostError):
        queue.progress(claim, ProgressEvent(1, 1, 0.1))


def test_fail_records_the_error(make_queue):
    queue = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    job = queue.submit(make_spec(), "a")
    claim = queue.claim("w1")
    queue.publishing(claim, "c" * 64, {})
    queue.fail(claim, TrainingFailedError("expected a finite loss, found nan at step 3"))
    record = queue.get(job.id)
    assert record.status == JobStatus.FAILED and record.version is None
    assert record.error == {"type": "training_failed", "message": "expected a finite loss, found nan at step 3"}
    time.sleep(SHORT_LEASE_S + 0.2)
    assert queue.claim("w2") is None


def test_max_pending_is_a_typed_error(make_queue):
    queue = make_queue(max_pending=2)
    queue.submit(make_spec(), "a")
    queue.submit(make_spec(), "b")
    with pytest.raises(EngineOverloadedError, match="fewer than 2 training jobs") as info:
        queue.submit(make_spec(), "a")
    assert info.value.retry_after_s > 0
    assert len(queue.list_jobs("a")) == 1  # the refused job left no record
    claim = queue.claim("w1")
    queue.complete(claim, "d" * 64, {})
    queue.submit(make_spec(), "a")  # a finished job frees its place


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(make_queue):
    queue = make_queue(visibility_timeout_s=0.3, max_attempts=2)
    job = queue.submit(make_spec(), "a")
    assert queue.claim("w1").attempt == 1
    time.sleep(0.45)
    assert queue.claim("w2").attempt == 2
    time.sleep(0.45)
    assert queue.claim("w3") is None
    record = queue.get(job.id)
    assert record.status == JobStatus.FAILED and record.attempts == 2
    assert record.error["type"] == "attempts_exhausted" and "within 2 attempts" in record.error["message"]


def test_a_job_with_a_pending_version_gets_one_more_attempt(make_queue):
    queue = make_queue(visibility_timeout_s=0.3, max_attempts=1)
    job = queue.submit(make_spec(), "a")
    queue.publishing(queue.claim("w1"), "f" * 64, {})
    time.sleep(0.45)
    assert queue.claim("w2").attempt == 2  # to check whether the put landed
    time.sleep(0.45)
    assert queue.claim("w3") is None
    record = queue.get(job.id)
    assert (record.status, record.version, record.error["type"]) == (JobStatus.FAILED, None, "attempts_exhausted")


def test_release_requeues_at_once_without_counting_the_attempt(make_queue):
    queue = make_queue()
    job = queue.submit(make_spec(), "a")
    queue.release(queue.claim("w1"))
    assert queue.get(job.id).status == JobStatus.QUEUED
    claim = make_queue().claim("w2")
    assert (claim.job_id, claim.attempt) == (job.id, 1)


def test_unknown_job_ids(make_queue):
    queue = make_queue()
    with pytest.raises(JobNotFoundError, match="expected a training job with id"):
        queue.get(uuid.uuid4().hex)
    with pytest.raises(JobNotFoundError, match="32 hex digits"):
        queue.get("../../etc/passwd")


def test_records_survive_a_new_queue_object(make_queue):
    queue = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    done, running = queue.submit(make_spec("a/done"), "a"), queue.submit(make_spec("a/running"), "a")
    claim = queue.claim("w1")
    queue.complete(claim, "e" * 64, {"exact_match": 1.0})
    queue.claim("w1")  # then the process dies, holding `running`
    queue.close()
    time.sleep(SHORT_LEASE_S + 0.2)
    reopened = make_queue(visibility_timeout_s=SHORT_LEASE_S)
    assert reopened.get(done.id).status == JobStatus.SUCCEEDED
    assert [r.id for r in reopened.list_jobs("a")] == [running.id, done.id]
    claim = reopened.claim("w2")
    assert (claim.job_id, claim.attempt, claim.spec) == (running.id, 2, make_spec("a/running"))
