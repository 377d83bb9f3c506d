"""The training worker: jobs through the queue to the store, failures recorded, one version per job
whatever point a worker dies at."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefixserve.adapters_store import decode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.store import blob_version
from prefixserve.cli import _engine_args, adapter_store
from prefixserve.errors import InvalidRequestError, TrainingDataError, TrainingFailedError
from prefixserve.training.cli_commands import add_training_commands, train_spec_dict
from prefixserve.training.queue import JobStatus
from prefixserve.training.redis_queue import RedisJobQueue
from prefixserve.training.spec import ProgressEvent, TrainedAdapter, parse_job_spec
from prefixserve.training.sqlite_queue import SqliteJobQueue
from prefixserve.training.worker import Worker

REPO = Path(__file__).resolve().parents[2]
TASK = "default/sentiment"
EXAMPLES = [{"input": f"{word} movie", "output": label} for word, label in [
    ("great", "positive"), ("awful", "negative"), ("lovely", "positive"), ("boring", "negative"),
    ("superb", "positive"), ("dreadful", "negative"), ("charming", "positive"), ("dull", "negative")]]
LEASE_S = 0.4


def make_spec(**overrides):
    raw = {"task": TASK, "kind": "prompt", "examples": EXAMPLES, "eval_fraction": 0.25,
           "hyperparameters": {"steps": 4, "batch_size": 2, "num_virtual_tokens": 4, "max_length": 32}}
    for name, value in overrides.items():
        if name in ("steps", "max_length", "learning_rate", "batch_size"):
            raw["hyperparameters"][name] = value
        else:
            raw[name] = value
    return parse_job_spec(raw)


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request, tmp_path):
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


@pytest.fixture
def store(tmp_path):
    store = LocalStore(tmp_path / "store")
    yield store
    store.close()


class FakeTraining:
    """A stand-in for run_job that reports progress and returns fixed bytes, counting its calls."""

    def __init__(self, before_return=None):
        self.calls = 0
        self.before_return = before_return

    def __call__(self, spec, backbone, store, progress, work_dir):
        self.calls += 1
        work_dir.mkdir(parents=True, exist_ok=True)
        for step in (1, 2):
            progress(ProgressEvent(step=step, total_steps=2, loss=1.0 / step))
        if self.before_return is not None:
            self.before_return()
        return TrainedAdapter(artifact=b"artifact of " + spec.task.encode(), kind="prompt",
                              metrics={"exact_match": 0.5})


def fake_worker(queue, store, tmp_path, run_job, worker_id="w1", **options):
    return Worker(queue, store, backbone=None, work_root=tmp_path / "work", worker_id=worker_id, block_s=0.0,
                  run_job=run_job, **options)


# --- the worker's bookkeeping, with fake training (both queues) ---

def test_a_job_is_published_once_and_its_work_dir_removed(make_queue, store, tmp_path):
    queue = make_queue()
    job = queue.submit(make_spec(), "default")
    assert fake_worker(queue, store, tmp_path, FakeTraining()).run(max_jobs=1) == 1
    record = queue.get(job.id)
    assert record.status == JobStatus.SUCCEEDED and record.metrics == {"exact_match": 0.5}
    assert record.version == store.current(TASK) == blob_version(b"artifact of " + TASK.encode())
    assert record.progress["step"] == 2
    assert not (tmp_path / "work" / job.id).exists()


def test_an_unexpected_error_fails_the_job_and_the_worker_goes_on(make_queue, store, tmp_path):
    queue = make_queue()
    broken, fine = queue.submit(make_spec(task="default/broken"), "default"), queue.submit(make_spec(), "default")
    fake = FakeTraining()

    def run_job(spec, *args):
        if spec.task == "default/broken":
            raise RuntimeError("boom")
        return fake(spec, *args)

    assert fake_worker(queue, store, tmp_path, run_job).run(max_jobs=2) == 2
    assert queue.get(broken.id).error == {"type": "internal_error", "message": "RuntimeError: boom"}
    assert queue.get(fine.id).status == JobStatus.SUCCEEDED
    assert store.list_tasks() == {TASK: queue.get(fine.id).version}


def test_a_diverged_job_fails_and_publishes_nothing(make_queue, store, tmp_path):
    queue = make_queue()
    job = queue.submit(make_spec(), "default")

    def diverging(spec, backbone, store, progress, work_dir):
        progress(ProgressEvent(step=1, total_steps=4, loss=float("nan")))
        raise TrainingFailedError("training diverged at step 1: the loss is nan; nothing was published")

    fake_worker(queue, store, tmp_path, diverging).run(max_jobs=1)
    record = queue.get(job.id)
    assert record.status == JobStatus.FAILED and record.version is None
    assert record.error == {"type": "training_failed",
                            "message": "training diverged at step 1: the loss is nan; nothing was published"}
    assert record.progress["loss"] is None
    assert store.list_tasks() == {}


def test_killed_after_the_put_the_next_attempt_only_completes(make_queue, store, tmp_path):
    queue = make_queue(visibility_timeout_s=LEASE_S)
    job = queue.submit(make_spec(), "default")
    # The first worker gets as far as the put, then dies: no complete, no more heartbeats.
    claim = queue.claim("w1")
    artifact = b"artifact of " + TASK.encode()
    queue.publishing(claim, blob_version(artifact), {"exact_match": 0.5})
    store.put(TASK, artifact, "prompt")
    time.sleep(LEASE_S + 0.2)
    fake = FakeTraining()
    fake_worker(make_queue(visibility_timeout_s=LEASE_S), store, tmp_path, fake, worker_id="w2").run(max_jobs=1)
    record = queue.get(job.id)
    assert fake.calls == 0  # nothing trained again
    assert (record.status, record.attempts, record.metrics) == (JobStatus.SUCCEEDED, 2, {"exact_match": 0.5})
    assert [r.version for r in store.history(TASK)] == [record.version]


def test_killed_before_the_put_the_next_attempt_trains_and_publishes_once(make_queue, store, tmp_path):
    queue = make_queue(visibility_timeout_s=LEASE_S)
    job = queue.submit(make_spec(), "default")
    claim = queue.claim("w1")
    queue.publishing(claim, blob_version(b"artifact of " + TASK.encode()), {"exact_match": 0.5})
    time.sleep(LEASE_S + 0.2)  # dead before store.put
    fake = FakeTraining()
    fake_worker(make_queue(visibility_timeout_s=LEASE_S), store, tmp_path, fake, worker_id="w2").run(max_jobs=1)
    record = queue.get(job.id)
    assert fake.calls == 1 and record.status == JobStatus.SUCCEEDED
    assert [r.version for r in store.history(TASK)] == [record.version]


@pytest.mark.parametrize("put_landed", [True, False])
def test_the_extra_attempt_of_a_publishing_job_never_trains(make_queue, store, tmp_path, put_landed):
    queue = make_queue(visibility_timeout_s=LEASE_S, max_attempts=1)
    job = queue.submit(make_spec(), "default")
    claim = queue.claim("w1")  # the only attempt dies while publishing
    artifact = b"artifact of " + TASK.encode()
    queue.publishing(claim, blob_version(artifact), {"exact_match": 0.5})
    if put_landed:
        store.put(TASK, artifact, "prompt")
    time.sleep(LEASE_S + 0.2)
    fake = FakeTraining()
    fake_worker(make_queue(visibility_timeout_s=LEASE_S, max_attempts=1), store, tmp_path, fake, "w2").run(max_jobs=1)
    record = queue.get(job.id)
    assert fake.calls == 0 and record.attempts == 2
    if put_landed:
        assert record.status == JobStatus.SUCCEEDED and store.current(TASK) == record.version
    else:
        assert record.status == JobStatus.FAILED and record.error["type"] == "attempts_exhausted"
        assert store.list_tasks() == {}


def test_a_worker_whose_lease_lapsed_publishes_nothing(make_queue, store, tmp_path):
    queue = make_queue(visibility_timeout_s=LEASE_S)
    job = queue.submit(make_spec(), "default")
    other = make_queue(visibility_timeout_s=LEASE_S)
    taken_over = []

    def stall():  # hung past the lease (no heartbeat), then another worker takes the job
        time.sleep(LEASE_S + 0.2)
        taken_over.append(other.claim("w2"))

    fake_worker(queue, store, tmp_path, FakeTraining(before_return=stall), heartbeat_s=100).run(max_jobs=1)
    assert taken_over[0].job_id == job.id
    assert store.list_tasks() == {}
    assert queue.get(job.id).status == JobStatus.RUNNING and queue.get(job.id).worker_id == "w2"


def test_the_heartbeat_keeps_a_slow_step_claimed(make_queue, store, tmp_path):
    queue = make_queue(visibility_timeout_s=LEASE_S)
    job = queue.submit(make_spec(), "default")
    other = make_queue(visibility_timeout_s=LEASE_S)
    stolen = []

    def slow_step():  # no progress for three leases: only the heartbeat renews
        for _ in range(6):
            time.sleep(LEASE_S / 2)
            stolen.append(other.claim("w2"))

    fake_worker(queue, store, tmp_path, FakeTraining(before_return=slow_step)).run(max_jobs=1)
    assert stolen == [None] * 6
    assert queue.get(job.id).status == JobStatus.SUCCEEDED


def test_stop_gives_the_running_job_back(make_queue, store, tmp_path):
    queue = make_queue()
    job = queue.submit(make_spec(), "default")
    stop = threading.Event()

    def stopped_mid_training(spec, backbone, store, progress, work_dir):
        work_dir.mkdir(parents=True)
        (work_dir / "checkpoint").write_bytes(b"step 1")
        progress(ProgressEvent(step=1, total_steps=4, loss=1.0))
        stop.set()  # SIGTERM arrives during step 2
        progress(ProgressEvent(step=2, total_steps=4, loss=0.5))
        raise AssertionError("expected the worker to stop at the progress report")

    assert fake_worker(queue, store, tmp_path, stopped_mid_training).run(stop=stop) == 1
    record = queue.get(job.id)
    assert (record.status, record.attempts) == (JobStatus.QUEUED, 0)
    assert (tmp_path / "work" / job.id / "checkpoint").exists()  # the next attempt here resumes
    assert store.list_tasks() == {}


# --- real training on the tiny backbone (SQLite queue, local store) ---

def test_a_prompt_job_trains_and_is_published(tiny_training_backbone, store, tmp_path):
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    job = queue.submit(make_spec(), "default")
    Worker(queue, store, tiny_training_backbone, tmp_path / "work", "w1", block_s=0.0).run(max_jobs=1)
    record = queue.get(job.id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert store.current(TASK) == record.version
    artifact = decode_artifact(store.get(record.version), expected_fingerprint=tiny_training_backbone.fingerprint,
                               limits=tiny_training_backbone.limits, arch=tiny_training_backbone.arch)
    assert artifact.kind == "prompt"
    assert record.progress["step"] == record.progress["total_steps"] == 4
    assert "train_loss" in record.metrics
    card = store.history(TASK)[0].card  # published with the version, for GET /v1/tasks/{name}
    assert card["job_id"] == job.id and card["metrics"] == record.metrics and card["kind"] == "prompt"
    queue.close()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"suite_task": "no-such-task", "examples": []}, "unknown task 'no-such-task'"),
    ({"examples": [{"input": "x", "output": "a very long answer " * 20}] * 4}, "at most max_length=32 tokens"),
])
def test_bad_data_fails_the_job_and_publishes_nothing(tiny_training_backbone, store, tmp_path, overrides, message):
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    job = queue.submit(make_spec(**overrides), "default")
    Worker(queue, store, tiny_training_backbone, tmp_path / "work", "w1", block_s=0.0).run(max_jobs=1)
    record = queue.get(job.id)
    assert record.status == JobStatus.FAILED and record.error["type"] == "invalid_training_data"
    assert message in record.error["message"]
    assert store.list_tasks() == {}
    queue.close()


# --- processes: kill -9 mid-training, `prefixserve train` ---

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefixserve.cli", *args]


def cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("REDIS_URL", "PREFIXSERVE_MODEL", "PREFIXSERVE_QUEUE_DB", "PREFIXSERVE_WORK_DIR"):
        env.pop(name, None)
    return env


def worker_args(model_dir: Path, tmp_path: Path, worker_id: str) -> list[str]:
    return cli("worker", "--model", str(model_dir), "--queue-db", str(tmp_path / "jobs.sqlite3"), "--store-dir",
               str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--visibility-timeout", "2",
               "--max-jobs", "1", "--worker-id", worker_id)


def start_worker_and_wait_for_training(model_dir: Path, tmp_path: Path, queue, job_id: str, worker_id: str):
    """A worker process, once the job's progress shows a step >= 1 (it is mid-training)."""
    log = tmp_path / f"{worker_id}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(worker_args(model_dir, tmp_path, worker_id), env=cli_env(), stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while (progress := queue.get(job_id).progress) is None or progress["step"] < 1:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"expected worker {worker_id} to report progress within 120 s, found none:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process


def test_a_sigkilled_worker_job_completes_exactly_once(tiny_model_dir, tmp_path):
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite3", visibility_timeout_s=2.0)
    job = queue.submit(make_spec(steps=60), "default")  # ~0.1 s a step on a CPU: seconds, not minutes
    first = start_worker_and_wait_for_training(tiny_model_dir, tmp_path, queue, job.id, "first")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = queue.get(job.id)
    assert killed_at.status == JobStatus.RUNNING and killed_at.progress["step"] < 60
    second = subprocess.run(worker_args(tiny_model_dir, tmp_path, "second"), env=cli_env(), capture_output=True,
                            timeout=240)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    record = queue.get(job.id)
    assert (record.status, record.attempts, record.worker_id) == (JobStatus.SUCCEEDED, 2, "second"), record.error
    store = LocalStore(tmp_path / "store")
    assert [r.version for r in store.history(TASK)] == [record.version]
    queue.close()


def test_sigterm_gives_the_job_back_and_exits_cleanly(tiny_model_dir, tmp_path):
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    job = queue.submit(make_spec(steps=200), "default")
    worker = start_worker_and_wait_for_training(tiny_model_dir, tmp_path, queue, job.id, "terminated")
    worker.send_signal(signal.SIGTERM)
    try:
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    record = queue.get(job.id)
    assert (record.status, record.attempts) == (JobStatus.QUEUED, 0)
    assert record.progress["step"] < 200
    assert not (tmp_path / "store").exists() or LocalStore(tmp_path / "store").list_tasks() == {}
    queue.close()


def test_train_command_publishes_and_prints_the_version(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    done = subprocess.run(cli("train", "--model", str(tiny_model_dir), "--store-dir", str(tmp_path / "store"),
                              "--task", "sentiment", "--kind", "prompt", "--data", str(data), "--steps", "3",
                              "--batch-size", "2", "--num-virtual-tokens", "4", "--max-length", "32"),
                          env=cli_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout)
    assert LocalStore(tmp_path / "store").current(TASK) == result["version"]
    assert "train_loss" in result["metrics"]


def test_train_command_refuses_bad_data(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("")
    done = subprocess.run(cli("train", "--model", str(tmp_path / "never-loaded"), "--store-dir",
                              str(tmp_path / "store"), "--task", "t", "--kind", "prompt", "--data", str(data)),
                          env=cli_env(), capture_output=True, timeout=120)
    assert done.returncode == 2
    last_line = done.stderr.decode().strip().splitlines()[-1]
    assert last_line.startswith("prefixserve: ") and "found an empty file" in last_line
    assert not (tmp_path / "store").exists() or LocalStore(tmp_path / "store").list_tasks() == {}


@pytest.mark.parametrize(("flags", "content", "message"), [
    (["--data", "DATA"], '{"input": "a", "output": "b"}\nnot json\n', "line 2: expected one JSON object"),
    (["--data", "DATA"], '{"input": "a"}\n', "line 1: expected {'input', 'output'}"),
    (["--suite-task", "s", "--steps", "0"], "", "hyperparameters.steps"),
    (["--suite-task", "s", "--init", "text", "--rank", "-1"], "", "hyperparameters.rank"),
])
def test_train_flags_become_a_validated_spec(tmp_path, flags, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    flags = [str(data) if flag == "DATA" else flag for flag in flags]
    with pytest.raises(TrainingDataError, match=re.escape(message)):
        parse_job_spec(train_spec_dict(train_args("--task", "t", "--kind", "prompt", *flags)))


def test_train_flags_name_tasks_in_the_default_tenant(tmp_path):
    raw = train_spec_dict(train_args("--task", "ipt", "--kind", "intrinsic", "--suite-task", "sentiment",
                                     "--subspace", "space", "--intrinsic-dim", "5", "--steps", "7", "--seed", "3"))
    spec = parse_job_spec(raw)
    assert (spec.task, spec.hyperparameters.subspace, spec.suite_task) == ("default/ipt", "default/space", "sentiment")
    assert (spec.hyperparameters.steps, spec.hyperparameters.intrinsic_dim, spec.seed) == (7, 5, 3)
    raw = train_spec_dict(train_args("--task", "space", "--kind", "subspace", "--source", "a=sentiment",
                                     "--source", "b=capitals"))
    assert parse_job_spec(raw).sources == ({"task": "default/a", "suite_task": "sentiment"},
                                           {"task": "default/b", "suite_task": "capitals"})
    with pytest.raises(InvalidRequestError, match="may not contain '/'"):
        train_spec_dict(train_args("--task", "other/t", "--kind", "prompt", "--suite-task", "s"))


def test_train_flags_shape_an_adapter_job(tmp_path):
    raw = train_spec_dict(train_args("--task", "t", "--kind", "adapter", "--suite-task", "word_size",
                                     "--bottleneck-size", "8", "--bottleneck-placements", "mlp",
                                     "--bottleneck-activation", "gelu"))
    hp = parse_job_spec(raw).hyperparameters
    assert (hp.bottleneck_size, hp.bottleneck_placements, hp.bottleneck_activation) == (8, ("mlp",), "gelu")
    houlsby = parse_job_spec(train_spec_dict(train_args("--task", "t", "--kind", "adapter", "--suite-task", "s",
                                                        "--bottleneck-placements", "attention", "mlp")))
    assert houlsby.hyperparameters.bottleneck_placements == ("attention", "mlp")
    with pytest.raises(TrainingDataError, match=re.escape("hyperparameters.bottleneck_size 1..64, found 65")):
        parse_job_spec(train_spec_dict(train_args("--task", "t", "--kind", "adapter", "--suite-task", "s",
                                                  "--bottleneck-size", "65")))
    with pytest.raises(SystemExit):  # argparse refuses a placement or activation the kind does not have
        train_args("--task", "t", "--kind", "adapter", "--bottleneck-activation", "swish")


def train_args(*argv: str):
    parser = argparse.ArgumentParser(prog="prefixserve")
    add_training_commands(parser.add_subparsers(dest="command"), add_engine_args=_engine_args,
                          make_store=adapter_store)
    return parser.parse_args(["train", *argv])
