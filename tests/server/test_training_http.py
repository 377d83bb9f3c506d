"""The training job endpoints over real HTTP, backed by a real SQLite job queue."""

import httpx
import pytest
import torch
from http_server import serving

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.errors import TrainingDataError
from prefixserve.server.auth import Authenticator
from prefixserve.server.tenants import FileTenantRegistry, TenantLimits
from prefixserve.server.training_protocol import TrainingHyperparameters, TrainingJobRequest
from prefixserve.server.training_routes import MAX_JOB_BODY_BYTES, MAX_UNFINISHED_JOBS_PER_TENANT
from prefixserve.training.spec import ProgressEvent, parse_job_spec
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
        # A name the engine would refuse at publish, after minutes of training: refused before it is queued.
        ({**JOB, "task": "my colors"}, "letters, digits and ._:-"),
        ({**JOB, "task": ".hidden"}, "starting with a letter or digit"),
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


def test_a_deeply_nested_spec_is_a_400_and_queues_nothing(server, keys, queue):
    with client(server, keys, "ben") as ben:
        before = len(queue.list_jobs("ben"))
        deep = b'{"task": "x", "kind": "prompt", "examples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        resp = ben.post("/v1/training/jobs", content=deep, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and "nested too deeply" in resp.json()["error"]["message"], resp.text
        assert len(queue.list_jobs("ben")) == before


@pytest.fixture(scope="module")
def limited(smollm2, tmp_path_factory):
    """A server of its own (an empty queue with room for every tenant's jobs) and tenants with limits."""
    registry = FileTenantRegistry(tmp_path_factory.mktemp("tenants") / "tenants.json")
    found = {}
    for name, limits in (("dana", TenantLimits(max_tasks=1)), ("eve", TenantLimits()), ("fay", TenantLimits())):
        registry.create(name, limits=limits)
        found[name] = registry.add_key(name)[1]
    q = SqliteJobQueue(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3", max_pending=100)
    with serving(smollm2, auth=Authenticator(registry), job_queue=q) as running:
        yield running, (registry, found), q
    q.close()


def test_a_tenant_at_max_tasks_cannot_queue_a_job_that_would_create_another(limited):
    server, keys, queue = limited
    sync = server[1]
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    data = encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)
    with client(server, keys, "dana") as dana:
        kept = dana.put("/v1/tasks/kept", files={"file": ("a.safetensors", data, "application/octet-stream")})
        assert kept.status_code == 201, kept.text
        over = dana.post("/v1/training/jobs", json={**JOB, "task": "new"})
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1, over.text
        assert "has 1 tasks" in over.json()["error"]["message"] and "limit is 1" in over.json()["error"]["message"]
        assert queue.list_jobs("dana") == []  # nothing was queued
        retrain = dana.post("/v1/training/jobs", json={**JOB, "task": "kept"})  # not a new task
        assert retrain.status_code == 201, retrain.text
        assert dana.delete("/v1/tasks/kept").status_code == 200
        # The store is empty now, but the queued job will publish "kept": a job for another task is still over.
        pending = dana.post("/v1/training/jobs", json={**JOB, "task": "other"})
        assert pending.status_code == 429 and "unfinished training jobs" in pending.json()["error"]["message"]
        assert [j["task"] for j in dana.get("/v1/training/jobs").json()["jobs"]] == ["kept"]


def test_a_tenant_can_have_only_so_many_unfinished_jobs(limited):
    server, keys, queue = limited
    with client(server, keys, "eve") as eve, client(server, keys, "fay") as fay:
        for i in range(MAX_UNFINISHED_JOBS_PER_TENANT):
            resp = eve.post("/v1/training/jobs", json={**JOB, "task": f"t{i}"})
            assert resp.status_code == 201, resp.text
        over = eve.post("/v1/training/jobs", json={**JOB, "task": "one-more"})
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1, over.text
        message = over.json()["error"]["message"]
        assert f"{MAX_UNFINISHED_JOBS_PER_TENANT} training jobs queued or running" in message, message
        assert len(queue.list_jobs("eve")) == MAX_UNFINISHED_JOBS_PER_TENANT
        assert fay.post("/v1/training/jobs", json=JOB).status_code == 201  # the cap is per tenant
        claim = queue.claim("test-worker")  # a worker finishing one of eve's jobs frees a slot
        while claim.record.tenant != "eve":
            claim = queue.claim("test-worker")
        queue.fail(claim, TrainingDataError("stopped by the test"))
        assert eve.post("/v1/training/jobs", json={**JOB, "task": "one-more"}).status_code == 201


def test_a_spec_is_strictly_typed_and_a_body_without_content_type_is_still_json(limited):
    server, keys, queue = limited
    cases = [
        ({**JOB, "hyperparameters": {"steps": "5"}}, "hyperparameters.steps: Input should be a valid integer"),
        ({**JOB, "hyperparameters": {"steps": 5.0}}, "hyperparameters.steps: Input should be a valid integer"),
        ({**JOB, "seed": True}, "seed: Input should be a valid integer"),
        ({**JOB, "eval_fraction": "0.2"}, "eval_fraction: Input should be a valid number"),
        ({**JOB, "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({**JOB, "hyperparameters": {"stepz": 5}}, "hyperparameters.stepz: Extra inputs are not permitted"),
        ({**JOB, "examples": ["great -> positive"]}, "examples.0: Input should be a valid dictionary"),
        ({"kind": "prompt", "suite_task": "made_up_color"}, "task: Field required"),
    ]
    with client(server, keys, "fay") as fay:
        before = len(queue.list_jobs("fay"))
        for body, message in cases:
            resp = fay.post("/v1/training/jobs", json=body)
            assert resp.status_code == 400 and resp.json()["error"]["message"] == message, (body, resp.text)
        assert len(queue.list_jobs("fay")) == before
        bare = fay.post("/v1/training/jobs", content=httpx.Request("POST", "/", json=JOB).content)
        assert bare.status_code == 201, bare.text  # how clients of this route have always been able to send it


def test_the_specs_the_openapi_schema_shows_as_examples_are_queued(limited):
    server, keys, queue = limited
    examples = TrainingJobRequest.model_json_schema()["examples"]
    with client(server, keys, "fay") as fay:
        for example in examples:
            resp = fay.post("/v1/training/jobs", json=example)
            assert resp.status_code == 201 and resp.json()["task"] == example["task"], resp.text
            assert queue.get(resp.json()["id"]).task == f"fay/{example['task']}"


def test_a_running_then_failed_job_reads_back_with_progress_metrics_and_error(limited):
    server, keys, queue = limited
    with client(server, keys, "fay") as fay:
        job = fay.post("/v1/training/jobs", json={**JOB, "task": "read-back"}).json()
        claim = queue.claim("test-worker")
        while claim.record.id != job["id"]:  # older jobs of other tests come first
            claim = queue.claim("test-worker")
        queue.progress(claim, ProgressEvent(step=2, total_steps=5, loss=float("nan"), eta_s=1.5,
                                            eval_metrics={"exact_match": 0.5}))
        queue.publishing(claim, "ab" * 32, {"train_loss": 0.25, "exact_match": 1.0})
        running = fay.get(f"/v1/training/jobs/{job['id']}")
        assert running.status_code == 200, running.text
        assert running.json() == {**job, "status": "running", "started_at": running.json()["started_at"],
                                  "attempts": 1, "version": "ab" * 32,
                                  "progress": {"step": 2, "total_steps": 5, "loss": None, "eta_s": 1.5,
                                               "eval_metrics": {"exact_match": 0.5}},
                                  "metrics": {"train_loss": 0.25, "exact_match": 1.0}}  # no worker internals
        queue.fail(claim, TrainingDataError("examples[3]: too long for max_length 128"))
        failed = [j for j in fay.get("/v1/training/jobs").json()["jobs"] if j["id"] == job["id"]]
        assert failed[0]["status"] == "failed" and failed[0]["version"] is None
        assert failed[0]["error"] == {"type": "invalid_training_data",
                                      "message": "examples[3]: too long for max_length 128"}


def test_an_ia3_job_reaches_the_worker_with_its_projections_and_its_fields_are_strict(limited):
    server, keys, queue = limited
    hyperparameters = {"steps": 5, "ia3_targets": ["q_proj", "up_proj"], "ia3_feedforward": ["up_proj"]}
    with client(server, keys, "fay") as fay:
        resp = fay.post("/v1/training/jobs", json={**JOB, "task": "scaled", "kind": "ia3",
                                                   "hyperparameters": hyperparameters})
        assert resp.status_code == 201 and resp.json()["kind"] == "ia3", resp.text
        claim = queue.claim("test-worker")
        while claim.record.id != resp.json()["id"]:  # older jobs of other tests come first
            claim = queue.claim("test-worker")
        hp = claim.spec.hyperparameters
        assert (hp.ia3_targets, hp.ia3_feedforward) == (("q_proj", "up_proj"), ("up_proj",))
        queue.fail(claim, TrainingDataError("stopped by the test"))
        cases = [
            ({"ia3_target": ["q_proj"]}, "hyperparameters.ia3_target: Extra inputs are not permitted"),
            ({"ia3_targets": "q_proj"}, "hyperparameters.ia3_targets: Input should be a valid list"),
            ({"ia3_feedforward": [1]}, "hyperparameters.ia3_feedforward.0: Input should be a valid string"),
        ]
        before = len(queue.list_jobs("fay"))
        for bad, message in cases:
            resp = fay.post("/v1/training/jobs", json={**JOB, "kind": "ia3", "hyperparameters": bad})
            assert resp.status_code == 400 and resp.json()["error"]["message"] == message, (bad, resp.text)
        # Well-typed but not servable: parse_job_spec's message, naming the field.
        unscaled = {**JOB, "kind": "ia3", "hyperparameters": {"ia3_targets": ["lm_head"]}}
        resp = fay.post("/v1/training/jobs", json=unscaled)
        message = resp.json()["error"]["message"]
        assert resp.status_code == 400 and "expected hyperparameters.ia3_targets among" in message, resp.text
        assert len(queue.list_jobs("fay")) == before


def test_a_bitfit_job_reaches_the_worker_with_its_projections_and_bad_names_are_400s(limited):
    server, keys, queue = limited
    with client(server, keys, "fay") as fay:
        resp = fay.post("/v1/training/jobs", json={**JOB, "task": "shifted", "kind": "bitfit",
                                                   "hyperparameters": {"steps": 5, "bitfit_targets": ["o_proj",
                                                                                                      "gate_proj"]}})
        assert resp.status_code == 201 and resp.json()["kind"] == "bitfit", resp.text
        default = fay.post("/v1/training/jobs", json={**JOB, "task": "shifted-all", "kind": "bitfit"})
        assert default.status_code == 201, default.text
        claimed = {}
        while len(claimed) < 2:  # older jobs of other tests come first
            claim = queue.claim("test-worker")
            if claim.record.id in (resp.json()["id"], default.json()["id"]):
                claimed[claim.record.id] = claim.spec.hyperparameters.bitfit_targets
                queue.fail(claim, TrainingDataError("stopped by the test"))
        assert claimed == {resp.json()["id"]: ("o_proj", "gate_proj"),
                           default.json()["id"]: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")}
        cases = [
            ({"bitfit_target": ["q_proj"]}, "hyperparameters.bitfit_target: Extra inputs are not permitted"),
            ({"bitfit_targets": "q_proj"}, "hyperparameters.bitfit_targets: Input should be a valid list"),
            ({"bitfit_targets": [7]}, "hyperparameters.bitfit_targets.0: Input should be a valid string"),
            # Well-typed but not servable: parse_job_spec's messages, naming the field.
            ({"bitfit_targets": []}, "expected hyperparameters.bitfit_targets a non-empty list of distinct "
                                     "projection names, found []"),
            ({"bitfit_targets": ["q_proj", "q_proj"]}, "expected hyperparameters.bitfit_targets a non-empty list of "
                                                       "distinct projection names, found ['q_proj', 'q_proj']"),
            ({"bitfit_targets": ["lm_head"]}, "expected hyperparameters.bitfit_targets among ['q_proj', 'k_proj', "
                                              "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], found "
                                              "['lm_head']"),
        ]
        before = len(queue.list_jobs("fay"))
        for bad, message in cases:
            resp = fay.post("/v1/training/jobs", json={**JOB, "kind": "bitfit", "hyperparameters": bad})
            assert resp.status_code == 400 and resp.json()["error"]["message"] == message, (bad, resp.text)
        assert len(queue.list_jobs("fay")) == before


def test_an_adapter_job_reaches_the_worker_with_its_bottlenecks_and_bad_ones_are_400s(limited):
    server, keys, queue = limited
    with client(server, keys, "fay") as fay:
        hyperparameters = {"steps": 5, "bottleneck_size": 8, "bottleneck_placements": ["mlp"],
                           "bottleneck_activation": "gelu"}
        resp = fay.post("/v1/training/jobs", json={**JOB, "task": "bottlenecked", "kind": "adapter",
                                                   "hyperparameters": hyperparameters})
        assert resp.status_code == 201 and resp.json()["kind"] == "adapter", resp.text
        default = fay.post("/v1/training/jobs", json={**JOB, "task": "bottlenecked-houlsby", "kind": "adapter"})
        assert default.status_code == 201, default.text
        claimed = {}
        while len(claimed) < 2:  # older jobs of other tests come first
            claim = queue.claim("test-worker")
            if claim.record.id in (resp.json()["id"], default.json()["id"]):
                hp = claim.spec.hyperparameters
                claimed[claim.record.id] = (hp.bottleneck_size, hp.bottleneck_placements, hp.bottleneck_activation,
                                            hp.learning_rate)
                queue.fail(claim, TrainingDataError("stopped by the test"))
        assert claimed == {resp.json()["id"]: (8, ("mlp",), "gelu", 1e-3),
                           default.json()["id"]: (16, ("attention", "mlp"), "relu", 1e-3)}
        cases = [
            ({"bottleneck_sizes": 8}, "hyperparameters.bottleneck_sizes: Extra inputs are not permitted"),
            ({"bottleneck_size": "8"}, "hyperparameters.bottleneck_size: Input should be a valid integer"),
            ({"bottleneck_placements": "mlp"}, "hyperparameters.bottleneck_placements: Input should be a valid list"),
            ({"bottleneck_activation": 1}, "hyperparameters.bottleneck_activation: Input should be a valid string"),
            # Well-typed but not servable: parse_job_spec's messages, naming the field.
            ({"bottleneck_size": 65}, "expected hyperparameters.bottleneck_size 1..64, found 65"),
            ({"bottleneck_placements": ["mlp", "attention"]}, "expected hyperparameters.bottleneck_placements a "
                                                              "non-empty sorted list of distinct placements among "
                                                              "['attention', 'mlp'], found ['mlp', 'attention']"),
            ({"bottleneck_activation": "swish"}, "expected hyperparameters.bottleneck_activation one of 'gelu', "
                                                 "'relu', 'silu', 'tanh', found 'swish'"),
        ]
        before = len(queue.list_jobs("fay"))
        for bad, message in cases:
            resp = fay.post("/v1/training/jobs", json={**JOB, "kind": "adapter", "hyperparameters": bad})
            assert resp.status_code == 400 and resp.json()["error"]["message"] == message, (bad, resp.text)
        assert len(queue.list_jobs("fay")) == before


def _documented(model, name: str) -> dict:
    schema = model.model_json_schema()["properties"][name]
    return next((branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"), schema)


@pytest.mark.parametrize("name", [n for n, f in TrainingHyperparameters.model_fields.items()
                                  if "minimum" in _documented(TrainingHyperparameters, n)
                                  and _documented(TrainingHyperparameters, n)["type"] == "integer"])
def test_the_documented_range_of_a_hyperparameter_is_the_one_parse_job_spec_enforces(name):
    documented = _documented(TrainingHyperparameters, name)
    low, high = documented["minimum"], documented["maximum"]
    spec = {**JOB, "task": "t/colors"}
    for value in (low, high):
        assert getattr(parse_job_spec({**spec, "hyperparameters": {name: value}}).hyperparameters, name) == value
    for value in (low - 1, high + 1):
        with pytest.raises(TrainingDataError, match=f"hyperparameters.{name}"):
            parse_job_spec({**spec, "hyperparameters": {name: value}})


@pytest.mark.parametrize("model, name", [(TrainingJobRequest, "kind"), (TrainingHyperparameters, "init"),
                                         (TrainingHyperparameters, "encoder"),
                                         (TrainingHyperparameters, "bottleneck_activation")])
def test_the_documented_names_of_a_field_are_the_ones_parse_job_spec_accepts(model, name):
    spec = {**JOB, "task": "t/colors", "hyperparameters": {"subspace": "t/sub"}}

    def with_value(value: str) -> dict:
        if model is TrainingHyperparameters:
            return {**spec, "hyperparameters": {**spec["hyperparameters"], name: value}}
        if value == "subspace":  # a subspace job learns from its sources only
            return {**spec, name: value, "suite_task": None,
                    "sources": [{"task": "t/a", "suite_task": "made_up_color"}]}
        return {**spec, name: value}

    for value in _documented(model, name)["enum"]:
        parse_job_spec(with_value(value))
    with pytest.raises(TrainingDataError, match=name):
        parse_job_spec(with_value("undocumented"))


def test_the_documented_placements_are_the_ones_parse_job_spec_accepts():
    documented = _documented(TrainingHyperparameters, "bottleneck_placements")["items"]["enum"]
    spec = {**JOB, "task": "t/colors", "kind": "adapter"}
    for placements in ([documented[0]], [documented[1]], documented):
        hp = parse_job_spec({**spec, "hyperparameters": {"bottleneck_placements": placements}}).hyperparameters
        assert hp.bottleneck_placements == tuple(placements)
    with pytest.raises(TrainingDataError, match="bottleneck_placements"):
        parse_job_spec({**spec, "hyperparameters": {"bottleneck_placements": ["undocumented"]}})


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

