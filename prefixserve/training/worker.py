"""The training worker: claim a job, train it against the shared backbone, publish it exactly once.

One job at a time. While a job trains, a heartbeat thread renews its lease every third of the
visibility timeout (a training step may take longer than a progress report is apart), so only a dead
or hung worker's job is taken over. Publishing is fenced and recorded:

    queue.publishing(claim, version, metrics)   # fenced: fails if another worker took the job over
    store.put(task, artifact, kind, requires)   # atomic and idempotent in the store
    queue.complete(claim, version, metrics)

A worker killed between any two of these lines leaves the job running with its lease lapsing; the
next attempt sees the pending version and, if the put landed (`already_published`), only completes,
else trains again, resuming from the checkpoint in work_root/<job id>. So one job publishes one version.

Stopping (`stop` set, e.g. by the CLI's SIGTERM handler): between jobs the loop just ends; during
training the worker stops at the trainer's next progress report, gives the job back to the queue
(`release`, not counted as an attempt) and keeps its checkpoint, so whoever claims it next on this
machine resumes. A job already past training is published and completed before the worker exits."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from prefixserve.adapters_store.store import AdapterStore, blob_version
from prefixserve.errors import PrefixServeError, StoreUnavailableError
from prefixserve.training.queue import Claim, ClaimLostError, JobQueue, JobRecord, attempts_exhausted
from prefixserve.training.spec import ProgressEvent, TrainedAdapter

logger = logging.getLogger(__name__)

_UNAVAILABLE_BACKOFF_S = 2.0  # between claims while the queue cannot be reached


class _Stopped(BaseException):
    """Raised from the progress callback to unwind a job when the worker is asked to stop. A
    BaseException, so trainers that turn unexpected errors into job failures let it through."""


class Worker:
    """`backbone` is a TrainingBackbone loaded once for every job; `run_job` defaults to
    prefixserve.training.runner.run_job (a parameter so tests can substitute failures)."""

    def __init__(self, queue: JobQueue, store: AdapterStore, backbone, work_root: Path, worker_id: str | None = None,
                 *, block_s: float = 1.0, heartbeat_s: float | None = None, run_job: Callable | None = None):
        self.queue, self.store, self.backbone = queue, store, backbone
        self.work_root = Path(work_root)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.block_s = block_s
        self.heartbeat_s = heartbeat_s or queue.visibility_timeout_s / 3
        if run_job is None:
            from prefixserve.training.runner import run_job
        self._run_job = run_job
        self._stop = threading.Event()

    def run(self, stop: threading.Event | None = None, max_jobs: int | None = None) -> int:
        """Claim and run jobs until `stop` is set or `max_jobs` jobs were handled; returns how many."""
        self._stop = stop or threading.Event()
        num_jobs = 0
        while not self._stop.is_set() and (max_jobs is None or num_jobs < max_jobs):
            try:
                claim = self.queue.claim(self.worker_id, block_s=self.block_s)
            except StoreUnavailableError as e:
                logger.warning("%s: %s; retrying", self.worker_id, e.message)
                self._stop.wait(_UNAVAILABLE_BACKOFF_S)
                continue
            if claim is not None:
                self.run_one(claim)
                num_jobs += 1
        return num_jobs

    def run_one(self, claim: Claim) -> JobRecord | None:
        """Run one claimed job to succeeded or failed; returns its record, or None if the job was given
        back (stopping) or left to be re-claimed (taken over, or the queue or store unreachable)."""
        spec, work_dir = claim.spec, self.work_root / claim.job_id
        logger.info("%s: job %s (attempt %d): %s %s", self.worker_id, claim.job_id, claim.attempt, spec.kind,
                    spec.task)
        lost = threading.Event()
        try:
            with self._heartbeat(claim, lost):
                if already_published(self.store, claim.record):
                    logger.info("job %s: version %s was published by attempt %d; completing", claim.job_id,
                                claim.record.version[:12], claim.attempt - 1)
                    self.queue.complete(claim, claim.record.version, claim.record.metrics or {})
                elif claim.attempt > self.queue.max_attempts:  # the extra attempt a pending version gets
                    raise attempts_exhausted(claim.record, self.queue.max_attempts)
                else:
                    result = self._run_job(spec, self.backbone, self.store, self._progress_fn(claim, lost), work_dir)
                    version = blob_version(result.artifact)
                    self.queue.publishing(claim, version, result.metrics)
                    card = {"job_id": claim.job_id, **(result.card or {})}  # shown with the version
                    self.store.put(spec.task, result.artifact, result.kind, requires=_required_versions(result),
                                   card=card)
                    self.queue.complete(claim, version, result.metrics)
                    logger.info("job %s: published %s version %s", claim.job_id, spec.task, version[:12])
        except _Stopped:
            logger.info("job %s: stopping; giving the job back to the queue", claim.job_id)
            with _logged("release", claim):
                self.queue.release(claim)
            return None
        except (ClaimLostError, StoreUnavailableError) as e:
            logger.warning("job %s: %s; leaving it to be re-claimed", claim.job_id, e.message)
            return None
        except PrefixServeError as e:  # bad data, divergence, an unservable adapter, ...
            logger.info("job %s failed: %s", claim.job_id, e.message)
            self._fail(claim, e)
        except Exception as e:
            logger.exception("job %s: unexpected error", claim.job_id)
            self._fail(claim, PrefixServeError(f"{type(e).__name__}: {e}"))  # code "internal_error"
        shutil.rmtree(work_dir, ignore_errors=True)
        with _logged("read back", claim):
            return self.queue.get(claim.job_id)
        return None

    def _fail(self, claim: Claim, error: PrefixServeError) -> None:
        with _logged("fail", claim):
            self.queue.fail(claim, error)

    def _progress_fn(self, claim: Claim, lost: threading.Event) -> Callable[[ProgressEvent], None]:
        def progress(event: ProgressEvent) -> None:
            if lost.is_set():
                raise ClaimLostError(f"job {claim.job_id} was taken over by another worker (attempt "
                                     f"{claim.attempt} of {self.worker_id} lost its lease)")
            if self._stop.is_set():
                raise _Stopped
            try:
                self.queue.progress(claim, event)
            except StoreUnavailableError as e:  # a blip must not cost the job; the heartbeat keeps trying
                logger.warning("job %s: progress not recorded: %s", claim.job_id, e.message)
        return progress

    @contextlib.contextmanager
    def _heartbeat(self, claim: Claim, lost: threading.Event) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    self.queue.renew(claim)
                except ClaimLostError:
                    lost.set()
                    return
                except Exception as e:  # the next beat may get through before the lease lapses
                    logger.warning("job %s: lease not renewed: %s", claim.job_id, e)

        thread = threading.Thread(target=beat, name=f"heartbeat:{claim.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def already_published(store: AdapterStore, record: JobRecord) -> bool:
    """Whether an earlier attempt's put of its pending version landed: the version is current, or the task's
    history has it from after the attempt began publishing (both times are that worker's clock)."""
    if record.version is None or record.publishing_at is None:
        return False
    if store.current(record.task) == record.version:
        return True
    return any(r.version == record.version and r.created_at >= record.publishing_at for r in store.history(record.task))


def _required_versions(result: TrainedAdapter) -> tuple[str, ...]:
    """The stored versions the trained artifact cannot be served without, which the store must keep with it:
    an intrinsic's subspace, as its config names it (run_job has validated the artifact)."""
    if result.kind != "intrinsic":
        return ()
    from prefixserve.adapters_store.format import read_safetensors_header  # torch: only when publishing one

    metadata, _ = read_safetensors_header(result.artifact)
    return (json.loads(metadata["config"])["subspace_version"],)


@contextlib.contextmanager
def _logged(operation: str, claim: Claim) -> Iterator[None]:
    """The job's outcome could not be recorded: its lease lapses and another attempt decides."""
    try:
        yield
    except PrefixServeError as e:
        logger.warning("job %s: %s not recorded: %s", claim.job_id, operation, e.message)
