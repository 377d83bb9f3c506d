"""/metrics over real HTTP after known traffic, read with Prometheus' own text parser; who may read
it when API keys are on, and that client-chosen names cannot grow it."""

import secrets

import httpx
import pytest
import torch
from http_server import serving
from prometheus_client.parser import text_string_to_metric_families

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.server.auth import Authenticator
from prefixserve.server.metrics import UNKNOWN_TASK
from prefixserve.server.tenants import FileTenantRegistry

pytestmark = pytest.mark.slow
ADMIN_KEY = "admin-key-for-metrics-tests"
METRICS_KEY = "metrics-key-for-metrics-tests"


def scrape(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def prompt_artifact(sync, seed: int) -> bytes:
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=torch.Generator().manual_seed(seed))
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)


def test_requests_tokens_latencies_and_engine_state_are_exported(client, server):
    _, sync = server
    data = prompt_artifact(sync, 0)
    assert client.put("/v1/tasks/metered", files={"file": ("a.safetensors", data)}).status_code == 201
    for task in ("base", "base", "metered"):
        resp = client.post("/v1/generate", json={"prompt": "Hello there", "task": task, "max_new_tokens": 5,
                                                 "temperature": 0, "ignore_eos": True})
        assert resp.status_code == 200
    assert client.post("/v1/generate", json={"prompt": "Hi", "task": "missing"}).status_code == 404
    openai = client.post("/v1/completions", json={"model": "metered", "prompt": "Hi", "max_tokens": 3,
                                                   "temperature": 0, "ignore_eos": True})
    assert openai.status_code == 200

    m = scrape(client)
    base = (("task", "base"), ("tenant", "default"))
    metered = (("task", "metered"), ("tenant", "default"))
    assert m[("prefixserve_requests_total", (("finish_reason", "length"), *base))] == 2
    assert m[("prefixserve_requests_total", (("finish_reason", "length"), *metered))] == 2
    assert m[("prefixserve_generation_tokens_total", base)] == 10
    assert m[("prefixserve_generation_tokens_total", metered)] == 8
    assert m[("prefixserve_time_to_first_token_seconds_count", base)] == 2
    assert m[("prefixserve_queue_time_seconds_count", metered)] == 2
    assert m[("prefixserve_time_per_output_token_seconds_count", metered)] == 2
    missing = (("task", UNKNOWN_TASK), ("tenant", "default"), ("type", "task_not_found"))
    assert m[("prefixserve_request_errors_total", missing)] == 1
    assert m[("prefixserve_kv_pages_total", ())] == sync.pages.num_pages
    assert m[("prefixserve_kv_pages_free", ())] <= sync.pages.num_pages
    assert m[("prefixserve_adapters_on_device", ())] >= 1
    assert ("prefixserve_host_cache_hits_total", ()) in m and ("prefixserve_adapter_cold_loads_total", ()) in m


@pytest.fixture(scope="module")
def keyed(smollm2, tmp_path_factory):
    """A server with API keys on and a metrics key; yields (admin client, tenant client, sync engine)."""
    registry = FileTenantRegistry(tmp_path_factory.mktemp("tenants") / "tenants.json")
    with (serving(smollm2, auth=Authenticator(registry, ADMIN_KEY, METRICS_KEY)) as (url, sync),
          httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin):
        assert admin.post("/v1/admin/tenants", json={"name": "acme"}).status_code == 201
        key = admin.post("/v1/admin/tenants/acme/keys").json()["key"]
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as tenant:
            yield admin, tenant, sync


def metric_lines(client) -> list[str]:
    resp = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert resp.status_code == 200, resp.text
    return [line for line in resp.text.splitlines() if line and not line.startswith("#")]


def test_metrics_need_the_admin_or_metrics_key_when_keys_are_on(keyed):
    admin, tenant, _ = keyed
    with httpx.Client(base_url=str(admin.base_url), timeout=60) as anonymous:
        missing = anonymous.get("/metrics")
        wrong = anonymous.get("/metrics", headers={"Authorization": "Bearer psk_not-a-key"})
        by_metrics_key = anonymous.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        # the metrics key reads /metrics and nothing else
        assert anonymous.get("/v1/tasks", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 401
        assert anonymous.get("/v1/admin/tenants",
                             headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 401
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["type"] == "unauthorized"
    by_tenant = tenant.get("/metrics")
    assert by_tenant.status_code == 403 and "metrics key" in by_tenant.json()["error"]["message"]
    by_admin = admin.get("/metrics")
    assert by_admin.status_code == by_metrics_key.status_code == 200
    assert "prefixserve_kv_pages_total" in by_admin.text and "prefixserve_kv_pages_total" in by_metrics_key.text


def test_unknown_model_names_add_a_constant_number_of_series(keyed):
    _, tenant, sync = keyed
    assert tenant.put("/v1/tasks/real", files={"file": ("a.safetensors", prompt_artifact(sync, 1))}).status_code == 201
    gen = {"prompt": "Hi", "max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
    assert tenant.post("/v1/generate", json={**gen, "task": "real"}).status_code == 200
    before = metric_lines(tenant)
    names = [f"rnd-{secrets.token_hex(6)}" for _ in range(150)]
    for i, name in enumerate(names):
        if i % 2:
            resp = tenant.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        else:
            resp = tenant.post("/v1/generate", json={**gen, "task": name})
        assert resp.status_code == 404, resp.text
    after = metric_lines(tenant)
    text = "\n".join(after)
    assert not [name for name in names if name in text]
    # one error series (its _total and _created lines) for the tenant's unknown bucket
    assert len(after) - len(before) <= 4, sorted(set(after) - set(before))
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for family in text_string_to_metric_families(text + "\n") for s in family.samples}
    unknown = (("task", UNKNOWN_TASK), ("tenant", "acme"), ("type", "task_not_found"))
    assert m[("prefixserve_request_errors_total", unknown)] == 150
    assert m[("prefixserve_requests_total", (("finish_reason", "length"), ("task", "real"), ("tenant", "acme")))] == 1


def test_a_deleted_tasks_series_are_dropped(keyed):
    _, tenant, sync = keyed
    assert tenant.put("/v1/tasks/short-lived", files={"file": ("a.safetensors", prompt_artifact(sync, 2))}
                      ).status_code == 201
    gen = {"prompt": "Hi", "max_new_tokens": 2, "temperature": 0, "ignore_eos": True, "task": "short-lived"}
    assert tenant.post("/v1/generate", json=gen).status_code == 200
    assert any('task="short-lived"' in line for line in metric_lines(tenant))
    assert tenant.delete("/v1/tasks/short-lived").status_code == 200
    assert not [line for line in metric_lines(tenant) if 'task="short-lived"' in line]
    # a request naming it now counts as unknown, not under its old name
    assert tenant.post("/v1/generate", json=gen).status_code == 404
    assert not [line for line in metric_lines(tenant) if 'task="short-lived"' in line]


def test_gateway_inference_extension_gauges_follow_the_engine(keyed):
    """The names the Gateway API Inference Extension's endpoint picker reads from vLLM servers."""
    _, tenant, sync = keyed
    assert tenant.put("/v1/tasks/routed", files={"file": ("a.safetensors", prompt_artifact(sync, 3))}
                      ).status_code == 201
    body = {"prompt": "Hi", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True,
            "task": "routed"}
    with tenant.stream("POST", "/v1/generate", json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # held open: the request runs until the stream closes
        next(lines)
        m = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
             text_string_to_metric_families("\n".join(metric_lines(tenant)) + "\n") for s in family.samples}
    assert m[("vllm:num_requests_running", ())] == 1
    assert m[("vllm:num_requests_waiting", ())] == 0
    assert 0 < m[("vllm:gpu_cache_usage_perc", ())] <= 1
    (info,) = [labels for name, labels in m if name == "vllm:lora_requests_info"]
    assert dict(info) == {"running_lora_adapters": "routed", "waiting_lora_adapters": "",
                          "max_lora": str(sync.max_loras)}
