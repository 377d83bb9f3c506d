"""Retention over real HTTP: re-uploads keep a task's stored versions bounded by max_history, and a
tenant's max_task_bytes counts every version its tasks retain, old ones until they fall out."""

import contextlib
from pathlib import Path

import httpx
import pytest
import torch
from http_server import serving

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.errors import RateLimitedError
from prefixserve.server.auth import Authenticator, Caller
from prefixserve.server.quotas import check_store_quota
from prefixserve.server.tenants import FileTenantRegistry, TenantLimits

MAX_HISTORY = 3


@pytest.fixture(scope="module")
def artifact(tiny_backbone):
    """seed -> a prompt artifact for the tiny backbone; every seed gives other bytes of the same size."""
    fingerprint, hidden_size = backbone_fingerprint(tiny_backbone), tiny_backbone.arch.hidden_size

    def make(seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(4, hidden_size, generator=g) * 0.5
        return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, fingerprint)
    return make


def stored_versions(store: LocalStore) -> set[str]:
    return {p.name for p in Path(store.root, "blobs").glob("*/*") if not p.name.endswith(".tmp")}


@contextlib.contextmanager
def acme_client(tiny_backbone, tmp_path, store, **limits):
    """The server on `store`, and a client of tenant "acme" with these limits."""
    registry = FileTenantRegistry(tmp_path / "tenants.json")
    registry.create("acme", limits=TenantLimits(**limits))
    _, key = registry.add_key("acme")
    with (serving(tiny_backbone, store=store, auth=Authenticator(registry)) as (base_url, _),
          httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client):
        yield client


def upload(client, task, data):
    return client.put(f"/v1/tasks/{task}", files={"file": ("a.safetensors", data, "application/octet-stream")})


@pytest.fixture
def store(tmp_path):
    # No grace period: nothing here pins versions, and what falls out of a history is deleted at once.
    return LocalStore(tmp_path / "store", max_history=MAX_HISTORY, gc_grace_s=0)


def test_fifty_reuploads_of_one_task_keep_at_most_max_history_versions(tiny_backbone, tmp_path, store, artifact):
    with acme_client(tiny_backbone, tmp_path, store) as client:
        for seed in range(50):
            resp = upload(client, "t", artifact(seed))
            assert resp.status_code == 201, resp.text
            assert len(stored_versions(store)) <= MAX_HISTORY
        history = client.get("/v1/tasks/t").json()["history"]
    assert [r["version"] for r in history][0] == resp.json()["version"]
    assert stored_versions(store) == {r["version"] for r in history} and len(history) == MAX_HISTORY


def test_max_task_bytes_counts_every_version_a_tenants_tasks_retain(tiny_backbone, tmp_path, store, artifact):
    size = len(artifact(0))
    assert {len(artifact(seed)) for seed in range(20)} == {size}
    with acme_client(tiny_backbone, tmp_path, store, max_task_bytes=(MAX_HISTORY + 1) * size) as client:
        for seed in range(10):  # old versions fall out of a's history and stop counting
            assert upload(client, "a", artifact(seed)).status_code == 201
        assert upload(client, "b", artifact(10)).status_code == 201  # a retains 3, b 1: at the limit
        over = upload(client, "b", artifact(11))  # b would retain 2
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        message = over.json()["error"]["message"]
        assert (f"keeps {4 * size} bytes of task versions and this upload adds {size}, past its limit of "
                f"{4 * size} bytes" in message), message
        assert "old versions count until they fall out of their task's history" in message
        assert [r["version"] for r in client.get("/v1/tasks/b").json()["history"]] == \
            [artifact_version(artifact(10))]  # refused: nothing stored
        assert client.delete("/v1/tasks/a").status_code == 200  # frees what a retained
        assert upload(client, "b", artifact(11)).status_code == 201


def test_a_reupload_of_a_retained_version_adds_no_bytes(tmp_path, artifact):
    store = LocalStore(tmp_path / "store", max_history=MAX_HISTORY)
    old, new = artifact(0), artifact(1)
    store.put("acme/a", old, "prompt")
    store.put("acme/a", new, "prompt")
    caller = Caller("acme", limits=TenantLimits(max_task_bytes=2 * len(old)))
    check_store_quota(caller, store, "acme/a", len(old), artifact_version(old))  # back to a retained version
    check_store_quota(caller, store, "acme/b", len(new), artifact_version(new))  # the same bytes, another task
    check_store_quota(caller, store, "acme/a", len(new), artifact_version(new))  # already current: no change
    with pytest.raises(RateLimitedError, match=f"keeps {2 * len(old)} bytes of task versions and this upload "
                                               f"adds {len(old)}"):
        check_store_quota(caller, store, "acme/a", len(old))  # without its version an upload counts as new
