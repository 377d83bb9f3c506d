"""The tasks API over real HTTP with SmolLM2: upload a PEFT archive or an artifact, serve it,
list, show, roll back, delete; bad uploads are 4xx and leave nothing behind."""

import io
import tarfile

import pytest
import torch
from adapter_cases import make_peft_adapter, peft_configs, peft_greedy

from prefixserve.adapters_store.format import encode_artifact

pytestmark = pytest.mark.slow
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
PROMPT = "The weather today is"


def tar_gz(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="my-adapter")
    return buffer.getvalue()


def prompt_artifact(server, seed: int) -> bytes:
    _, sync = server
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=g) * 0.5
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings},
                           sync.adapters.fingerprint)


def upload(client, task, data, filename="adapter.bin"):
    return client.put(f"/v1/tasks/{task}", files={"file": (filename, data, "application/octet-stream")})


def generate(client, task):
    resp = client.post("/v1/generate", json={"prompt": PROMPT, "task": task, **GREEDY})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("case, kind", [("prefix", "prefix"), ("ia3-default", "ia3")])
def test_peft_archive_upload_is_served_like_peft(case, kind, client, server, smollm2_hf, smollm2_dir, tmp_path):
    peft_model = make_peft_adapter(smollm2_hf, peft_configs(smollm2_dir)[case], tmp_path / case, seed=3)
    resp = upload(client, f"support-{kind}", tar_gz(tmp_path / case), "support.tar.gz")
    assert resp.status_code == 201, resp.text
    assert resp.json()["kind"] == kind and len(resp.json()["version"]) == 64
    served = generate(client, f"support-{kind}")
    prompt_ids = server[1].backbone.tokenizer(PROMPT).input_ids
    assert served["token_ids"] == peft_greedy(peft_model, prompt_ids, GREEDY["max_new_tokens"])
    assert served["token_ids"] != generate(client, None)["token_ids"]


def test_list_show_rollback_delete(client, server):
    v1 = upload(client, "faq", prompt_artifact(server, 1)).json()["version"]
    v2 = upload(client, "faq", prompt_artifact(server, 2)).json()["version"]
    assert {"task": "faq", "version": v2} in client.get("/v1/tasks").json()["tasks"]
    shown = client.get("/v1/tasks/faq").json()
    assert shown["kind"] == "prompt" and shown["version"] == v2
    assert shown["card"] is None  # an upload says nothing of how it was made; a training job's version does
    assert [h["version"] for h in shown["history"]] == [v2, v1]
    on_v2 = generate(client, "faq")["token_ids"]
    assert client.get("/v1/tasks/faq").json()["residency"] == "device"

    resp = client.post("/v1/tasks/faq/rollback")
    assert resp.status_code == 200 and resp.json()["version"] == v1
    on_v1 = generate(client, "faq")["token_ids"]
    assert on_v1 != on_v2
    assert client.post("/v1/tasks/faq/rollback", json={"version": v2}).json()["version"] == v2
    assert generate(client, "faq")["token_ids"] == on_v2

    assert client.delete("/v1/tasks/faq").status_code == 200
    assert client.get("/v1/tasks/faq").status_code == 404
    resp = client.post("/v1/generate", json={"prompt": PROMPT, "task": "faq", **GREEDY})
    assert resp.status_code == 404 and "not registered" in resp.json()["error"]["message"]


@pytest.mark.parametrize("data, status, message", [
    (b"certainly not an adapter", 400, ""),
    (b"\0" * (9 << 20), 413, "limited to 8388608 bytes"),
])
def test_bad_uploads_are_refused_and_leave_nothing(client, data, status, message):
    resp = upload(client, "broken", data)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]["message"]
    assert client.get("/v1/tasks/broken").status_code == 404


def test_pickled_peft_folder_is_refused(client, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    resp = upload(client, "pickled", tar_gz(folder), "pickled.tar.gz")
    assert resp.status_code == 400 and "never unpickled" in resp.json()["error"]["message"]


def test_a_tenant_cannot_name_another_namespace(client):
    resp = client.post("/v1/generate", json={"prompt": PROMPT, "task": "other-tenant/secret", **GREEDY})
    assert resp.status_code == 400 and "may not contain '/'" in resp.json()["error"]["message"]
