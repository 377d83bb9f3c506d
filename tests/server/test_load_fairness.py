"""Load over real HTTP: 200 concurrent streaming clients over 20 tasks of 3 tenants (weights 1:2:1)
against the SmolLM2 server. Every request completes, and while every tenant still has requests
waiting, each tenant's share of the generated tokens is within 20% of its weight's share."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from http_server import serving

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.server.auth import Authenticator
from prefixserve.server.tenants import FileTenantRegistry

pytestmark = pytest.mark.slow
WEIGHTS = {"light": 1.0, "heavy": 2.0, "other": 1.0}
CLIENTS = {"light": 50, "heavy": 100, "other": 50}  # in proportion to weight: all stay backlogged about as long
TASKS = {"light": 7, "heavy": 7, "other": 6}
NEW_TOKENS = 16


async def stream_one(client: httpx.AsyncClient, task: str, arrivals: list[float]) -> str | None:
    body = {"prompt": "Write about the sea.", "task": task, "max_new_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/generate", json=body) as resp:
        if resp.status_code != 200:
            return f"{resp.status_code}: {(await resp.aread())[:200]!r}"
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return event["error"]["message"]
            now = time.monotonic()
            arrivals.extend([now] * len(event["token_ids"]))
    return None


async def run_clients(base_url: str, keys: dict[str, str]) -> tuple[list, dict[str, list[list[float]]]]:
    arrivals = {t: [[] for _ in range(n)] for t, n in CLIENTS.items()}
    clients = {t: httpx.AsyncClient(base_url=base_url, timeout=300, headers={"Authorization": f"Bearer {keys[t]}"},
                                    limits=httpx.Limits(max_connections=CLIENTS[t])) for t in CLIENTS}
    # Interleaved by weight (light, heavy, heavy, other, ...) so that no tenant arrives first by construction.
    order = [(t, i) for i in range(max(CLIENTS.values())) for t in CLIENTS if i < CLIENTS[t]]
    jobs = [stream_one(clients[t], f"task{i % TASKS[t]}", arrivals[t][i]) for t, i in order]
    try:
        errors = await asyncio.gather(*jobs)
    finally:
        for c in clients.values():
            await c.aclose()
    return [e for e in errors if e is not None], arrivals


def test_200_streams_complete_and_tenants_share_tokens_by_weight(smollm2, tmp_path):
    registry = FileTenantRegistry(tmp_path / "tenants.json")
    keys = {}
    for tenant, weight in WEIGHTS.items():
        registry.create(tenant, weight)
        keys[tenant] = registry.add_key(tenant)[1]
    config = EngineConfig(cache=CacheConfig(num_pages=512),
                          scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512, max_waiting=256),
                          adapters=AdapterLimits(max_artifact_bytes=8 << 20), max_lora_slots=4)
    with serving(smollm2, config, auth=Authenticator(registry)) as (base_url, sync):
        fingerprint, hidden = sync.adapters.fingerprint, sync.backbone.arch.hidden_size
        for t, (tenant, num_tasks) in enumerate(TASKS.items()):
            with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {keys[tenant]}"}) as c:
                for i in range(num_tasks):
                    g = torch.Generator().manual_seed(100 * t + i)
                    data = encode_artifact("prompt", {"num_virtual_tokens": 4},
                                           {"embeddings": torch.randn(4, hidden, generator=g) * 0.3}, fingerprint)
                    assert c.put(f"/v1/tasks/task{i}", files={"file": ("a", data)}).status_code == 201
        errors, arrivals = asyncio.run(run_clients(base_url, keys))
        assert errors == []
        assert all(len(a) == NEW_TOKENS for per in arrivals.values() for a in per)
        assert not sync.has_unfinished() and sync.pages.num_free_pages > 0

    # Backlogged window: from the first finished request (the batch admitted before every tenant had
    # arrived has begun to turn over) until the first tenant has received its last token.
    backlog_start = min(a[-1] for per in arrivals.values() for a in per)
    backlog_end = min(max(a[-1] for a in per) for per in arrivals.values())
    served = {tenant: sum(backlog_start < t <= backlog_end for a in per for t in a)
              for tenant, per in arrivals.items()}
    total, weight_total = sum(served.values()), sum(WEIGHTS.values())
    assert total > 0.5 * sum(CLIENTS.values()) * NEW_TOKENS, served  # the window covers most of the run
    print("tokens per tenant while all were backlogged:", served)
    for tenant, weight in WEIGHTS.items():
        share, expected = served[tenant] / total, weight / weight_total
        assert abs(share / expected - 1) <= 0.2, (served, tenant, share, expected)
