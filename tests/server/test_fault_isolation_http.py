"""Fault isolation over real HTTP with SmolLM2: an adapter that cannot be served is refused or fails
only its own requests, /health fails only when the engine itself does, a non-streaming request whose
client left is aborted, and a max_tokens the context cannot hold is a 400."""

import io
import json
import socket
import tarfile
import time

import httpx
import pytest
import torch
from http_server import serving
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from prefixserve.adapters_store.format import encode_artifact

pytestmark = pytest.mark.slow
GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}


def peft_lora_archive(arch, lora_alpha: float, rank: int = 4) -> bytes:
    """A PEFT LoRA folder (q_proj of every layer) as a .tar.gz, written as peft saves it."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(arch.num_layers):
        name = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        weights[f"{name}.lora_A.weight"] = torch.randn(rank, arch.hidden_size, generator=g)
        weights[f"{name}.lora_B.weight"] = torch.randn(arch.num_heads * arch.head_dim, rank, generator=g)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora_alpha,
              "target_modules": ["q_proj"], "bias": "none"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("adapter_config.json", json.dumps(config).encode()),
                           ("adapter_model.safetensors", save_safetensors(weights))):
            info = tarfile.TarInfo(f"my-lora/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def generate(client, task=None, **body):
    return client.post("/v1/generate", json={"prompt": "The weather today is", "task": task, **GREEDY, **body})


def assert_serving(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert generate(client).status_code == 200


def test_a_lora_whose_scaling_overflows_float32_is_a_400_and_nothing_is_stored(client, server):
    archive = peft_lora_archive(server[1].backbone.arch, lora_alpha=1e308)
    resp = client.put("/v1/tasks/huge-alpha", files={"file": ("lora.tar.gz", archive, "application/gzip")})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_adapter"
    assert "scaling (alpha 1e+308 / rank 4) to be finite in float32" in error["message"]
    assert client.get("/v1/tasks/huge-alpha").status_code == 404
    assert generate(client, "huge-alpha").status_code == 404
    assert_serving(client)


def test_a_stored_version_that_cannot_be_served_fails_only_its_own_requests(client, server):
    _, sync = server
    before = generate(client).json()["token_ids"]
    a, g = sync.backbone.arch, torch.Generator().manual_seed(1)
    tensors = {"layers.0.q_proj.lora_a": torch.randn(4, a.hidden_size, generator=g),
               "layers.0.q_proj.lora_b": torch.randn(a.num_heads * a.head_dim, 4, generator=g)}
    data = encode_artifact("lora", {"rank": 4, "alpha": 1e308, "use_rslora": False, "targets": ["q_proj"]},
                           tensors, sync.adapters.fingerprint)
    sync.store.put("default/legacy", data, "lora")  # as stored by a server that checked alpha in float64 only
    for _ in range(2):  # the first request and every later one: its own error, never the engine's
        resp = generate(client, "legacy")
        assert resp.status_code == 400, resp.text
        assert "scaling (alpha 1e+308 / rank 4) to be finite in float32" in resp.json()["error"]["message"]
    assert generate(client).json()["token_ids"] == before
    assert_serving(client)


def aborted_requests(client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "prefixserve_requests":
            return sum(s.value for s in family.samples
                       if s.name.endswith("_total") and s.labels["finish_reason"] == "abort")
    return 0.0


def wait_until(condition, timeout_s=30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


LONG = [
    ("/v1/generate", {"prompt": "Tell me a long story.", "max_new_tokens": 2000, "ignore_eos": True}),
    ("/v1/completions", {"model": "base", "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Tell me a long story."}],
                              "max_tokens": 2000, "ignore_eos": True}),
]


@pytest.mark.parametrize("route, body", LONG, ids=[route for route, _ in LONG])
def test_a_non_streaming_request_whose_client_leaves_is_aborted(client, server, route, body):
    base_url, sync = server
    aborted_before = aborted_requests(client)
    payload = json.dumps(body).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert wait_until(lambda: any(r.num_output_tokens for r in list(sync.requests.values())))
    # The client is gone: the request must end as aborted (not run to its 2000 tokens) and free its pages.
    assert wait_until(lambda: not sync.has_unfinished())
    assert wait_until(lambda: aborted_requests(client) == aborted_before + 1)
    assert sync.pages.num_free_pages + sum(len(h.prefix_pages) for h in sync.adapters.resident.values()) \
        == sync.pages.num_pages


@pytest.mark.parametrize("route, field", [("/v1/generate", "max_new_tokens"), ("/v1/completions", "max_tokens"),
                                          ("/v1/chat/completions", "max_tokens"),
                                          ("/v1/chat/completions", "max_completion_tokens")])
def test_max_tokens_beyond_the_context_is_a_400_that_states_both_numbers(client, server, route, field):
    body = {"prompt": "Hi", field: 10**9}
    if route != "/v1/generate":
        body["model"] = "base"
    if route == "/v1/chat/completions":
        body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], field: 10**9}
    resp = client.post(route, json=body)
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert f"too large: {10**9}. The context holds {server[1].max_model_len} tokens" in message
    assert "prompt tokens, leaving room for at most" in message


def test_health_fails_once_the_engine_itself_is_broken(smollm2, monkeypatch):
    with serving(smollm2) as (base_url, sync), httpx.Client(base_url=base_url, timeout=60) as c:
        assert c.get("/health").json() == {"status": "ok"}

        def broken(step):
            raise RuntimeError("the device is gone")

        monkeypatch.setattr(sync.runner, "execute", broken)
        resp = generate(c)
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "engine_dead"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "engine_dead"
        assert "the device is gone" in health.json()["error"]["message"]
        assert c.get("/ready").status_code == 503
