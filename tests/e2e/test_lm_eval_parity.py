"""lm-evaluation-harness parity (issue #17): lm-eval's `local-completions` against the real server with
`model=<task>` (a PEFT LoRA uploaded over HTTP) must score like lm-eval's Hugging Face backend loading
the same adapter with `peft=`: per document the same chosen answer and the same loglikelihoods (within
TOL), the same generated text, the same accuracy. Two local tasks (tests/e2e/lm_eval_tasks/): multiple
choice by loglikelihood (echo + prompt logprobs) and generate_until. Offline: the backbone is the
prepared SmolLM2 directory, the adapter is made here, the data are the JSONL files beside the YAMLs."""

import copy
import io
import tarfile
import time
from pathlib import Path

import datasets.config
import httpx
import lm_eval
import pytest
import torch
import yaml
from http_server import serving
from huggingface_hub import constants as hub_constants
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

pytestmark = pytest.mark.slow

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MC, GEN = "prefixserve_mc", "prefixserve_gen"
TASK = "lm-eval-lora"  # the served task = lm-eval's `model`
TOL = 1e-3  # |loglikelihood(server) - loglikelihood(HF)| per choice, in nats
LORA_SCALE = 0.3  # lora_B scaled down from peft's random init: the adapter matters, the model still reads


def task_configs(cache_dir: Path) -> list[dict]:
    """The two YAMLs as lm-eval task dicts, their data_files made absolute (the YAMLs name them relative
    to the working directory, for the CLI run from that folder) and the datasets cache kept in tmp."""
    configs = []
    for name in (MC, GEN):
        config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"] = {"data_files": {split: str(TASKS_DIR / f) for split, f in files.items()},
                                    "cache_dir": str(cache_dir)}
        configs.append(config)
    return configs


def evaluate(model, model_args=None, *, cache_dir: Path) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=task_configs(cache_dir),
                                   task_manager=TaskManager(include_defaults=False), log_samples=True,
                                   bootstrap_iters=0)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing leaves the machine. Without this, every `load_dataset("json", ...)` sends a HEAD to
    s3.amazonaws.com (datasets' download counter). The libraries read HF_HUB_OFFLINE when first
    imported, which may be before this module, so set their flags themselves (and restore them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def lora_dir(smollm2_hf, tmp_path_factory) -> Path:
    """A seeded random LoRA on q/v, saved by peft as a user would."""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(smollm2_hf), LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(LORA_SCALE)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_run(lora_dir, smollm2_dir, tmp_path_factory):
    """lm-eval's own `hf` backend (the class model="hf" names), with the adapter through `peft=`."""
    started = time.monotonic()
    lm = HFLM(pretrained=str(smollm2_dir), peft=str(lora_dir), dtype="float32", device="cpu", batch_size=1)
    assert isinstance(lm.model, PeftModel)
    require_adapter_matters(lm)
    results = evaluate(lm, cache_dir=tmp_path_factory.mktemp("datasets"))
    print(f"\nlm-eval hf backend: {time.monotonic() - started:.1f} s")
    return results


@pytest.fixture(scope="module")
def server_url(smollm2, lora_dir):
    """The real app under uvicorn on loopback, the adapter uploaded over HTTP as task TASK."""
    with serving(smollm2) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.put(f"/v1/tasks/{TASK}", files={"file": ("adapter.tar.gz", tar_gz(lora_dir))})
            assert resp.status_code == 201, resp.text
            assert resp.json()["kind"] == "lora"
        yield url


# How local-completions sends prompts: token ids one request each (lm-eval's default), and text four
# prompts a request (the server tokenizes; one choice per prompt, matched back by `index`).
CLIENTS = {"token-ids": {"tokenized_requests": True, "batch_size": 1},
           "text-batched": {"tokenized_requests": False, "batch_size": 4}}


@pytest.fixture(scope="module", params=list(CLIENTS))
def server_run(request, server_url, smollm2_dir, tmp_path_factory):
    """lm-eval's `local-completions` with model=TASK against the server."""
    started = time.monotonic()
    # tokenizer_backend named: "auto" would probe GET /tokenizer_info first. The tokenizer is needed
    # either way: lm-eval splits context and continuation into tokens itself (ctxlen).
    results = evaluate("local-completions", {
        "base_url": f"{server_url}/v1/completions", "model": TASK, "tokenizer": str(smollm2_dir),
        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "timeout": 120,
        **CLIENTS[request.param]}, cache_dir=tmp_path_factory.mktemp("datasets"))
    print(f"\nlm-eval local-completions ({request.param}): {time.monotonic() - started:.1f} s")
    return results


def tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="adapter")
    return buffer.getvalue()


@torch.inference_mode()
def require_adapter_matters(lm: HFLM) -> None:
    """The reference must differ from the bare backbone by far more than TOL, or parity proves nothing."""
    ids = torch.tensor([lm.tok_encode("The capital of France is Paris")])
    with_adapter = torch.log_softmax(lm.model(ids).logits, -1)
    with lm.model.disable_adapter():
        without = torch.log_softmax(lm.model(ids).logits, -1)
    assert (with_adapter - without).abs().max() > 100 * TOL, "the LoRA barely changes the reference"


def samples(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_multiple_choice_by_loglikelihood_matches_hf(hf_run, server_run):
    ours, ref = samples(server_run, MC), samples(hf_run, MC)
    assert ours.keys() == ref.keys() and len(ref) == 12
    problems = []
    for doc_id in sorted(ref):
        # resps: per choice [(loglikelihood, is_greedy)]
        lls = [r[0][0] for r in ours[doc_id]["resps"]]
        ref_lls = [r[0][0] for r in ref[doc_id]["resps"]]
        greedy = [r[0][1] for r in ours[doc_id]["resps"]]
        ref_greedy = [r[0][1] for r in ref[doc_id]["resps"]]
        if len(lls) != len(ref_lls) or max(abs(a - b) for a, b in zip(lls, ref_lls)) > TOL:
            problems.append(f"doc {doc_id}: loglikelihoods {lls} vs hf {ref_lls}")
        if max(range(len(lls)), key=lls.__getitem__) != max(range(len(ref_lls)), key=ref_lls.__getitem__):
            problems.append(f"doc {doc_id}: picked another choice ({lls} vs hf {ref_lls})")
        if ours[doc_id]["acc"] != ref[doc_id]["acc"]:
            problems.append(f"doc {doc_id}: acc {ours[doc_id]['acc']} vs hf {ref[doc_id]['acc']}")
        if greedy != ref_greedy:  # is_greedy: the continuation is the argmax at every position (top_logprobs)
            problems.append(f"doc {doc_id}: is_greedy {greedy} vs hf {ref_greedy}")
    worst = max(abs(a[0][0] - b[0][0]) for d in ref for a, b in zip(ours[d]["resps"], ref[d]["resps"]))
    n_greedy = sum(r[0][1] for d in ref for r in ref[d]["resps"])
    picks = {d: max(range(len(r["resps"])), key=lambda i, r=r: r["resps"][i][0][0]) for d, r in ours.items()}
    print(f"\nmax |loglikelihood(server) - loglikelihood(hf)| = {worst:.2e}; server picked {picks}, "
          f"{n_greedy} greedy continuations, "
          f"acc {server_run['results'][MC]['acc,none']:.4f} (hf {hf_run['results'][MC]['acc,none']:.4f})")
    assert not problems, "\n".join(problems)
    assert server_run["results"][MC]["acc,none"] == hf_run["results"][MC]["acc,none"]


def test_generate_until_matches_hf(hf_run, server_run):
    ours, ref = samples(server_run, GEN), samples(hf_run, GEN)
    assert ours.keys() == ref.keys() and len(ref) == 6
    problems = [f"doc {d}: {ours[d]['resps']} (exact_match {ours[d]['exact_match']}) vs hf {ref[d]['resps']} "
                f"(exact_match {ref[d]['exact_match']})"
                for d in sorted(ref)
                if ours[d]["resps"] != ref[d]["resps"] or ours[d]["filtered_resps"] != ref[d]["filtered_resps"]
                or ours[d]["exact_match"] != ref[d]["exact_match"]]
    score, ref_score = server_run["results"][GEN]["exact_match,strip"], hf_run["results"][GEN]["exact_match,strip"]
    print(f"\nserver generated {[ours[d]['filtered_resps'] for d in sorted(ours)]}, exact_match {score:.4f} "
          f"(hf {ref_score:.4f})")
    assert not problems, "\n".join(problems)
    assert score == ref_score
