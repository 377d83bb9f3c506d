"""Tenants over real HTTP: API keys, isolation between tenants, the admin API and per-tenant limits."""

import statistics
import time

import httpx
import pytest
import torch
from http_server import serving

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.server.auth import Authenticator
from prefixserve.server.tenants import FileTenantRegistry, TenantLimits

pytestmark = pytest.mark.slow
ADMIN_KEY = "admin-secret-for-tests"
GEN = {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return FileTenantRegistry(tmp_path_factory.mktemp("tenants") / "tenants.json")


@pytest.fixture(scope="module")
def server(smollm2, registry):
    with serving(smollm2, auth=Authenticator(registry, ADMIN_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


def new_tenant(admin, name, **body) -> httpx.Client:
    """Create a tenant through the admin API and return a client holding its new key."""
    resp = admin.post("/v1/admin/tenants", json={"name": name, **body})
    assert resp.status_code == 201, resp.text
    resp = admin.post(f"/v1/admin/tenants/{name}/keys")
    assert resp.status_code == 201, resp.text
    return httpx.Client(base_url=str(admin.base_url), timeout=60,
                        headers={"Authorization": f"Bearer {resp.json()['key']}"})


def artifact(server, seed) -> bytes:
    sync = server[1]
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=g) * 0.5
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings},
                           sync.adapters.fingerprint)


def upload(client, task, data):
    return client.put(f"/v1/tasks/{task}", files={"file": ("a.safetensors", data, "application/octet-stream")})


def test_missing_or_wrong_keys_are_401_with_one_message(server):
    with httpx.Client(base_url=server[0], timeout=60) as anonymous:
        missing = anonymous.post("/v1/generate", json=GEN)
        wrong = anonymous.post("/v1/generate", json=GEN, headers={"Authorization": "Bearer psk_not-a-key"})
        basic = anonymous.get("/v1/tasks", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert missing.status_code == wrong.status_code == basic.status_code == 401
    assert missing.json()["error"]["type"] == "unauthorized"
    assert wrong.json()["error"]["message"] == "the API key is not valid"
    assert anonymous.is_closed


def test_tenants_cannot_see_use_or_touch_each_others_tasks(server, admin):
    alice, bob = new_tenant(admin, "alice"), new_tenant(admin, "bob")
    with alice, bob:
        v1 = upload(alice, "secret", artifact(server, 1)).json()["version"]
        upload(alice, "secret", artifact(server, 2))
        assert [t["task"] for t in alice.get("/v1/tasks").json()["tasks"]] == ["secret"]
        assert bob.get("/v1/tasks").json()["tasks"] == []
        assert "secret" not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
        # Every way of reaching alice's task answers bob exactly as a task that does not exist.
        for method, path, kwargs in [
            ("GET", "/v1/tasks/{}", {}), ("POST", "/v1/tasks/{}/rollback", {}), ("DELETE", "/v1/tasks/{}", {}),
            ("POST", "/v1/generate", {"json": {**GEN, "task": "{}"}}),
            ("POST", "/v1/completions", {"json": {"model": "{}", "prompt": "Hi", "max_tokens": 2}}),
        ]:
            answers = []
            for task in ("secret", "no-such-task"):
                filled = {k: {f: (v.format(task) if isinstance(v, str) else v) for f, v in body.items()}
                          for k, body in kwargs.items()}
                resp = bob.request(method, path.format(task), **filled)
                answers.append((resp.status_code, resp.json()["error"]["message"].replace(task, "<task>")))
            assert answers[0] == answers[1] and answers[0][0] == 404, (method, path, answers)
        assert bob.post("/v1/generate", json={**GEN, "task": "alice/secret"}).status_code == 400
        # bob's own "secret" is a different task; alice's is untouched
        assert upload(bob, "secret", artifact(server, 3)).status_code == 201
        shown = alice.get("/v1/tasks/secret").json()
        assert len(shown["history"]) == 2 and shown["history"][1]["version"] == v1
        assert alice.post("/v1/generate", json={**GEN, "task": "secret"}).status_code == 200


def test_admin_api_is_admin_only_and_keys_take_effect_at_once(server, admin):
    carol = new_tenant(admin, "carol", weight=2.0)
    with carol:
        assert carol.get("/v1/admin/tenants").status_code == 403
        assert admin.post("/v1/generate", json=GEN).status_code == 403  # the admin key is not a tenant
        listed = {t["name"]: t for t in admin.get("/v1/admin/tenants").json()["tenants"]}
        assert listed["carol"]["weight"] == 2.0 and len(listed["carol"]["key_ids"]) == 1
        assert "keys" not in listed["carol"]  # digests never leave the server
        assert admin.post("/v1/admin/tenants", json={"name": "carol"}).status_code == 409
        assert admin.post("/v1/admin/tenants", json={"name": "../etc"}).status_code == 400
        assert carol.post("/v1/generate", json=GEN).status_code == 200
        key_id = listed["carol"]["key_ids"][0]
        assert admin.delete(f"/v1/admin/tenants/carol/keys/{key_id}").status_code == 200
        assert carol.post("/v1/generate", json=GEN).status_code == 401


def test_requests_per_minute_limit_is_429_with_retry_after(server, admin):
    with new_tenant(admin, "dave", limits={"requests_per_min": 2}) as dave:
        assert [dave.post("/v1/generate", json=GEN).status_code for _ in range(2)] == [200, 200]
        over = dave.post("/v1/generate", json=GEN)
        assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(over.headers["Retry-After"]) <= 30  # 2/min: one request back every 30 s


def test_tokens_per_minute_limit(server, admin):
    with new_tenant(admin, "erin", limits={"tokens_per_min": 10}) as erin:
        first = erin.post("/v1/generate", json={**GEN, "max_new_tokens": 12, "ignore_eos": True})
        assert first.status_code == 200  # admitted with budget left; charged as it generated
        over = erin.post("/v1/generate", json=GEN)
        assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
        assert int(over.headers["Retry-After"]) >= 1


def test_concurrency_limit_while_a_stream_is_open(server, admin):
    with new_tenant(admin, "frank", limits={"max_concurrent": 1}) as frank:
        body = {**GEN, "max_new_tokens": 200, "ignore_eos": True, "stream": True}
        with frank.stream("POST", "/v1/generate", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # held: dropping the iterator closes the connection (= abort)
            next(lines)
            second = frank.post("/v1/generate", json=GEN)
            assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
        deadline = time.monotonic() + 10  # the closed stream is aborted, which frees the slot
        while (resp := frank.post("/v1/generate", json=GEN)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resp.status_code == 200


def test_task_count_and_bytes_limits_store_nothing(server, admin):
    data = artifact(server, 4)
    with new_tenant(admin, "gina", limits={"max_tasks": 1}) as gina:
        assert upload(gina, "one", data).status_code == 201
        assert upload(gina, "one", artifact(server, 5)).status_code == 201  # replacing is not a new task
        over = upload(gina, "two", data)
        assert over.status_code == 429 and "limit is 1" in over.json()["error"]["message"]
        assert [t["task"] for t in gina.get("/v1/tasks").json()["tasks"]] == ["one"]
    with new_tenant(admin, "hank", limits={"max_task_bytes": len(data) + 10}) as hank:
        assert upload(hank, "one", data).status_code == 201
        assert upload(hank, "two", artifact(server, 5)).status_code == 429
        assert hank.get("/v1/tasks/two").status_code == 404


def test_authentication_time_does_not_depend_on_how_much_of_a_key_is_right(registry):
    """The key is hashed before any comparison: a near-miss costs what a random key costs."""
    registry.create("timing")
    _, key = registry.add_key("timing")
    auth = Authenticator(registry, ADMIN_KEY)
    near_miss, unrelated = key[:-1] + ("A" if key[-1] != "A" else "B"), "psk_" + "x" * (len(key) - 4)
    samples = {near_miss: [], unrelated: []}
    for _ in range(300):
        for candidate, times in samples.items():
            start = time.perf_counter_ns()
            with pytest.raises(Exception, match="not valid"):
                auth.authenticate(f"Bearer {candidate}")
            times.append(time.perf_counter_ns() - start)
    ratio = statistics.median(samples[near_miss]) / statistics.median(samples[unrelated])
    assert 0.5 < ratio < 2.0, ratio
    assert auth.authenticate(f"Bearer {key}").tenant == "timing"


def test_registry_file_survives_a_restart_and_stores_only_digests(registry):
    registry.create("ivy", 3.0, TenantLimits(max_concurrent=4))
    _, key = registry.add_key("ivy")
    assert key not in registry.path.read_text()
    again = FileTenantRegistry(registry.path)
    assert again.get("ivy").weight == 3.0 and again.get("ivy").limits.max_concurrent == 4
    assert Authenticator(again).authenticate(f"Bearer {key}").tenant == "ivy"
