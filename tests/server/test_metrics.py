"""/metrics over real HTTP after known traffic, read with Prometheus' own text parser."""

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from prefixserve.adapters_store.format import encode_artifact

pytestmark = pytest.mark.slow


def scrape(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_requests_tokens_latencies_and_engine_state_are_exported(client, server):
    _, sync = server
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=torch.Generator().manual_seed(0))
    data = encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)
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
    missing = (("task", "missing"), ("tenant", "default"), ("type", "task_not_found"))
    assert m[("prefixserve_request_errors_total", missing)] == 1
    assert m[("prefixserve_kv_pages_total", ())] == sync.pages.num_pages
    assert m[("prefixserve_kv_pages_free", ())] <= sync.pages.num_pages
    assert m[("prefixserve_adapters_on_device", ())] >= 1
    assert ("prefixserve_host_cache_hits_total", ()) in m and ("prefixserve_adapter_cold_loads_total", ()) in m
