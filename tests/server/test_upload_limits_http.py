"""A replica processes a bounded number of uploads at once: each holds its bytes and decoded tensors in
memory, so past the limit an upload is a 503 with Retry-After (nothing stored), not one more in a queue;
the ones in progress finish, and uploads are taken again once one is done."""

import threading
import time

import httpx
import torch
from helpers import GatedStore
from http_server import serving

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.server.tasks_routes import MAX_UPLOADS_IN_FLIGHT


def prompt_artifact(sync, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=g) * 0.3
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)


def test_uploads_past_the_limit_are_503_and_the_others_complete(tiny_backbone, tmp_path):
    store = GatedStore(tmp_path / "store")
    with serving(tiny_backbone, store=store) as served:
        (base_url, sync), slots = served, served.app.state.uploads
        results = {}

        def put(i: int) -> None:
            with httpx.Client(base_url=base_url, timeout=60) as c:
                results[i] = c.put(f"/v1/tasks/t{i}", files={"file": ("a", prompt_artifact(sync, i))}).status_code

        threads = [threading.Thread(target=put, args=(i,)) for i in range(MAX_UPLOADS_IN_FLIGHT)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while slots.in_flight < MAX_UPLOADS_IN_FLIGHT:  # every one is taken (the first inside the store write)
            assert time.monotonic() < deadline, slots.in_flight
            time.sleep(0.01)
        with httpx.Client(base_url=base_url, timeout=60) as c:
            refused = c.put("/v1/tasks/extra", files={"file": ("a", prompt_artifact(sync, 99))})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["type"] == "overloaded" and refused.headers["Retry-After"] == "2"
            assert f"{MAX_UPLOADS_IN_FLIGHT} uploads" in refused.json()["error"]["message"]
            assert "default/extra" not in store.list_tasks("default/")
            store.gate.set()
            for t in threads:
                t.join(60)
            assert results == {i: 201 for i in range(MAX_UPLOADS_IN_FLIGHT)} and slots.in_flight == 0
            assert c.put("/v1/tasks/extra", files={"file": ("a", prompt_artifact(sync, 99))}).status_code == 201
