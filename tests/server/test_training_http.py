"""The training job endpoints over real HTTP, backed by a real SQLite job queue."""

import httpx
import pytest
from http_server import serving

from prefixserve.server.auth import Authenticator
from prefixserve.server.tenants import FileTenantRegistry
from prefixserve.server.training_routes import MAX_JOB_BODY_BYTES
from prefixserve.training.sqlite_queue import SqliteJobQueue

pytestmark = pytest.mark.slow
JOB = {"task": "colors", "kind": "prompt", "suite_task": "made_up_color", "hyperparameters": {"steps": 5}}


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    q = SqliteJobQueue(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3", max_pending=3)
    yield q
    q.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    registry = FileTenantRegistry(tmp_path_factory.mktemp("tenants") / "tenants.json")
    found = {}
    for name in ("ann", "ben"):
        registry.create(name)
        found[name] = registry.add_key(name)[1]
    return registry, found


@pytest.fixture(scope="module")
def server(smollm2, queue, keys):
    with serving(smollm2, auth=Authenticator(keys[0]), job_queue=queue) as running:
        yield running


def client(server, keys, tenant):
    return httpx.Client(base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {keys[1][tenant]}"})


def test_a_job_is_queued_under_the_tenants_namespace_and_only_it_can_read_it(server, keys, queue):
    with client(server, keys, "ann") as ann, client(server, keys, "ben") as ben:
        resp = ann.post("/v1/training/jobs", json={**JOB, "sources": [], "seed": 3})
        assert resp.status_code == 201, resp.text
        job = resp.json()
        assert job["status"] == "queued" and job["task"] == "colors" and job["kind"] == "prompt"
        stored = queue.get(job["id"])
        assert stored.tenant == "ann" and stored.task == "ann/colors"  # namespaced before it reached the queue
        assert ann.get(f"/v1/training/jobs/{job['id']}").json()["id"] == job["id"]
        assert [j["id"] for j in ann.get("/v1/training/jobs").json()["jobs"]] == [job["id"]]
        assert ben.get("/v1/training/jobs").json()["jobs"] == []
        theirs, missing = ben.get(f"/v1/training/jobs/{job['id']}"), ben.get("/v1/training/jobs/" + "f" * 32)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["message"].replace(job["id"], "<id>") == \
            missing.json()["error"]["message"].replace("f" * 32, "<id>")


def test_bad_specs_are_400s_that_say_what_is_wrong(server, keys, queue):
    cases = [
        ({**JOB, "kind": "adapterfusion"}, "'kind'"),
        ({**JOB, "suite_task": "no_such_suite_task"}, "suite tasks"),
        ({**JOB, "hyperparameters": {"steps": 0}}, "hyperparameters.steps"),
        ({**JOB, "hyperparameters": {"intrinsic_dim": 0}}, "hyperparameters.intrinsic_dim"),
        ({"task": "x", "kind": "prompt", "examples": [{"input": "a"}]}, "examples[0]"),
        ({"task": "x", "kind": "prompt", "examples": []}, "training data"),
        ({**JOB, "task": "other/colors"}, "'/'"),
        ({**JOB, "kind": "intrinsic"}, "hyperparameters.subspace"),
    ]
    with client(server, keys, "ben") as ben:
        before = len(queue.list_jobs("ben"))
        for body, needle in cases:
            resp = ben.post("/v1/training/jobs", json=body)
            assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (body, resp.text)
        not_json = ben.post("/v1/training/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
        huge = ben.post("/v1/training/jobs", content=b" " * (MAX_JOB_BODY_BYTES + 1))
        assert huge.status_code == 413
        assert len(queue.list_jobs("ben")) == before  # nothing was queued


def test_the_sdk_submits_and_reads_jobs(server, keys):
    from prefixserve.clients import PrefixServeClient
    from prefixserve.clients.errors import PrefixServeAPIError

    with PrefixServeClient(server[0], api_key=keys[1]["ann"]) as sdk:
        job = sdk.submit_training_job({**JOB, "task": "sdk-colors"})
        assert job["task"] == "sdk-colors" and job["status"] == "queued"
        assert sdk.get_training_job(job["id"])["id"] == job["id"]
        assert job["id"] in [j["id"] for j in sdk.list_training_jobs()]
        with pytest.raises(PrefixServeAPIError) as bad:
            sdk.submit_training_job({**JOB, "kind": "nope"})
        assert bad.value.status == 400 and "'kind'" in str(bad.value)


def test_a_full_queue_is_503_with_retry_after(server, keys, queue):  # last: it leaves the queue full
    with client(server, keys, "ben") as ben:
        statuses = [ben.post("/v1/training/jobs", json=JOB).status_code for _ in range(4)]
        assert statuses.count(503) >= 1 and set(statuses) <= {201, 503}
        full = ben.post("/v1/training/jobs", json=JOB)
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1

