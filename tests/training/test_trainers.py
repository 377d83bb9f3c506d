"""PEFT trainers on a tiny Llama with SmolLM2's real tokenizer: every kind learns a toy task, exports
an artifact the server accepts, predicts what the engine serves, leaves the shared model untouched,
resumes bit-exactly from its checkpoint and fails loudly on divergence or bad data."""

import copy
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import decode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import TrainingDataError, TrainingFailedError
from prefixserve.models.loader import load_backbone
from prefixserve.training.data import encode_examples, format_prompt
from prefixserve.training.evaluate import predict, predict_ids
from prefixserve.training.runner import run_job
from prefixserve.training.spec import Hyperparameters, JobSpec, parse_job_spec
from prefixserve.training.trainers import CHECKPOINT_NAME, train_peft

KINDS = ("prompt", "prefix", "ptuning", "lora")
TOY = [{"input": f"word {w}", "output": o} for w, o in [("apple", "yes"), ("sky", "no"), ("grass", "yes"),
                                                         ("snow", "no")]]
UNSEEN = [{"input": w, "output": "?"} for w in ("word moon", "hello there", "1 2 3", "a longer sentence here")]
CHAT = [{"messages": [{"role": "user", "content": "word sky"}, {"role": "assistant", "content": "no"}]}]
HP = {"prompt": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, eval_max_new_tokens=6),
      "prefix": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, encoder_hidden=32,
                                eval_max_new_tokens=6),
      "ptuning": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, encoder_hidden=32,
                                 eval_max_new_tokens=6),
      "lora": Hyperparameters(steps=30, batch_size=4, learning_rate=0.01, rank=4, alpha=8.0, eval_max_new_tokens=6)}


def record(events):
    return lambda event: events.append(event)


@pytest.fixture(scope="module")
def backbone(tiny_training_backbone):
    return tiny_training_backbone


@pytest.fixture(scope="module")
def toy(backbone):
    return encode_examples(backbone.tokenizer, TOY, 64)


@pytest.fixture(scope="module")
def probe(backbone):
    """Logits of the plain model on a fixed input, and its module layout, before any job ran."""
    ids = torch.tensor([backbone.tokenizer(format_prompt("word apple")).input_ids])
    with torch.no_grad():
        logits = backbone.model(input_ids=ids).logits.clone()
    layout = [(name, type(m).__name__) for name, m in backbone.model.named_modules()]
    return ids, logits, layout


@pytest.fixture(scope="module")
def trained(backbone, toy, probe, tmp_path_factory):
    """One short job per kind (trained on first use and shared by the tests of that kind)."""
    results = {}

    def get(kind):
        if kind not in results:
            events, work_dir = [], tmp_path_factory.mktemp(f"job-{kind}")
            result = train_peft(backbone, kind, toy, toy, HP[kind], 0, record(events), work_dir, init_text="yes no",
                                labels=("yes", "no"))
            results[kind] = result, events, work_dir
        return results[kind]
    return get


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The server's own loader and engine over the same directory."""
    served = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    engine = LLMEngine(served, EngineConfig(cache=CacheConfig(num_pages=64), scheduler=SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=256)))
    yield engine
    engine.close()


def test_fingerprint_and_arch_match_the_server(backbone, tiny_model_dir):
    served = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    assert backbone.fingerprint == backbone_fingerprint(served)
    assert backbone.arch == served.arch
    assert backbone.eos_token_ids == served.eos_token_ids == {backbone.tokenizer.eos_token_id}
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


@pytest.mark.parametrize("kind", KINDS)
def test_kind_learns_the_toy_task_and_exports_a_servable_artifact(kind, trained, backbone, probe):
    result, events, work_dir = trained(kind)
    assert [e.step for e in events][-1] == 30 and events[-1].eta_s == 0
    first, last = events[0].loss, events[-1].loss
    assert last < first / 2, f"{kind}: loss {first:.2f} -> {last:.2f}"
    assert result.kind == ("prompt" if kind == "ptuning" else kind)
    artifact = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                               arch=backbone.arch)
    assert artifact.kind == result.kind
    assert result.metrics["eval_loss"] < first / 2 and 0 <= result.metrics["exact_match"] <= 1
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert (work_dir / "peft" / "adapter_model.safetensors").is_file() and (work_dir / CHECKPOINT_NAME).is_file()
    # The shared model is exactly as before: same modules, bitwise the same logits.
    ids, logits, layout = probe
    assert [(name, type(m).__name__) for name, m in backbone.model.named_modules()] == layout
    assert not hasattr(backbone.model, "peft_config")
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_serves_what_evaluation_predicted(kind, trained, backbone, engine):
    from peft import PeftModel

    from prefixserve.training.trainers import wrapped

    result, _, work_dir = trained(kind)
    task = f"acme/{kind}"
    engine.register_adapter(task, result.artifact)
    examples = TOY + UNSEEN + CHAT
    encoded = encode_examples(backbone.tokenizer, examples, 64)
    # A tenant sends the text prompt; the engine's tokenization is the trainer's.
    assert engine.make_request(format_prompt(TOY[0]["input"]), task=task).prompt_token_ids == encoded[0].prompt_ids
    max_new = HP[kind].eval_max_new_tokens
    completions = engine.generate([e.prompt_ids for e in encoded], SamplingParams(max_new_tokens=max_new,
                                                                                   temperature=0),
                                  tasks=[task] * len(encoded))
    eos = backbone.eos_token_ids
    with wrapped(backbone.model, lambda m: PeftModel.from_pretrained(m, work_dir / "peft")) as exported:
        ids = predict_ids(exported, encoded, max_new, eos)
        texts = predict(exported, backbone.tokenizer, encoded, max_new, eos)
    assert [[t for t in c.token_ids if t not in eos] for c in completions] == ids
    assert [c.text for c in completions] == texts
    served_em = sum(c.text.strip() == e.output_text.strip() for c, e in zip(completions, encoded[:4])) / 4
    assert served_em == result.metrics["exact_match"]


def test_resume_from_checkpoint_gives_the_same_artifact(backbone, toy, tmp_path):
    hp = Hyperparameters(steps=12, batch_size=2, learning_rate=0.05, num_virtual_tokens=3, encoder="lstm",
                         encoder_hidden=16)
    whole = train_peft(backbone, "ptuning", toy, [], hp, 5, lambda e: None, tmp_path / "whole")

    def stop_at_7(event):
        if event.step == 7:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        train_peft(backbone, "ptuning", toy, [], hp, 5, stop_at_7, tmp_path / "resumed")
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert any("lstm_head" in name for name in checkpoint)  # the encoder PEFT's export drops
    assert any(name.startswith("adam.exp_avg_sq.") for name in checkpoint)
    events = []
    resumed = train_peft(backbone, "ptuning", toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert events[0].step == 7  # continued after the step-6 checkpoint, not from scratch
    assert resumed.artifact == whole.artifact
    # Another job's checkpoint (a different seed) is not resumed.
    events = []
    train_peft(backbone, "ptuning", toy, [], hp, 6, record(events), tmp_path / "resumed")
    assert events[0].step == 1
    # Nor is a damaged one: the job starts over instead of failing.
    (tmp_path / "resumed" / CHECKPOINT_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    events = []
    again = train_peft(backbone, "ptuning", toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert again.artifact == whole.artifact
    assert events[0].step == 1


def test_divergence_fails_without_an_artifact(backbone, toy, tmp_path):
    poisoned = copy.deepcopy(backbone.model)
    with torch.no_grad():  # a token every prompt ends with ("Answer") now embeds to inf: the loss is NaN
        poisoned.get_input_embeddings().weight[toy[0].prompt_ids[-2]] = float("inf")
    broken = dataclasses.replace(backbone, model=poisoned)
    for kind in ("lora", "prompt"):
        with pytest.raises(TrainingFailedError, match="diverged at step 1: the loss is nan"):
            train_peft(broken, kind, toy, toy, HP[kind], 0, lambda e: None, tmp_path / kind)
        assert not (tmp_path / kind / "peft").exists()
    assert not hasattr(poisoned, "peft_config")  # LoRA was unloaded even though the job failed


def spec(kind="prompt", **fields) -> JobSpec:
    raw = {"task": "acme/t", "kind": kind, "examples": TOY, "eval_fraction": 0.5,
           "hyperparameters": {"steps": 2, "batch_size": 2, "num_virtual_tokens": 2, "max_length": 32}}
    return parse_job_spec({**raw, **fields})


def test_run_job_reports_zero_shot_and_progress_evals(backbone, tmp_path):
    events = []
    job = spec(hyperparameters={"steps": 2, "batch_size": 2, "num_virtual_tokens": 2, "eval_every": 1})
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), record(events), tmp_path / "job")
    assert {"train_loss", "eval_loss", "exact_match", "label_accuracy", "zero_shot_exact_match"} <= set(result.metrics)
    assert result.kind == "prompt"
    assert [e.step for e in events] == [1, 2] and set(events[0].eval_metrics) >= {"exact_match", "eval_loss"}


def test_run_job_bad_data_names_the_example(backbone, tmp_path):
    store = LocalStore(tmp_path / "store")
    long = [*TOY, {"input": "x", "output": "many words " * 20}]
    with pytest.raises(TrainingDataError, match=r"examples\[4\]: expected prompt \+ output of at most max_length=32"):
        run_job(spec(examples=long), backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match="expected 'kind' among"):
        run_job(dataclasses.replace(spec(), kind="adapter"), backbone, store, lambda e: None, tmp_path / "job")
    too_many_tokens = spec(hyperparameters={"num_virtual_tokens": 300})
    with pytest.raises(TrainingDataError, match="num_virtual_tokens below the backbone's context of 256"):
        run_job(too_many_tokens, backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match="hyperparameters.rank of at most 64"):
        run_job(spec("lora", hyperparameters={"rank": 128}), backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match=r"hyperparameters.targets among .* found \['lm_head'\]"):
        run_job(spec("lora", hyperparameters={"targets": ["q_proj", "lm_head"]}), backbone, store, lambda e: None,
                tmp_path / "job")
    assert store.list_tasks() == {}


def test_run_job_ipt_sources_must_be_published_prompt_tasks(backbone, trained, tmp_path):
    store = LocalStore(tmp_path / "store")
    subspace = {"task": "acme/sub", "kind": "subspace",
                "sources": [{"task": "acme/p", "examples": TOY}, {"task": "acme/l", "examples": TOY}]}
    with pytest.raises(TrainingDataError, match=r"sources\[0\]: expected task 'acme/p' to have a published adapter"):
        run_job(parse_job_spec(subspace), backbone, store, lambda e: None, tmp_path / "job")
    store.put("acme/p", trained("prompt")[0].artifact, "prompt")
    store.put("acme/l", trained("lora")[0].artifact, "lora")
    with pytest.raises(TrainingDataError, match=r"sources\[1\]: expected task 'acme/l' to hold a prompt-tuned"):
        run_job(parse_job_spec(subspace), backbone, store, lambda e: None, tmp_path / "job")
    intrinsic = spec("intrinsic", hyperparameters={"subspace": "acme/p"})
    with pytest.raises(TrainingDataError, match="expected task 'acme/p' to hold a subspace artifact, found kind"):
        run_job(intrinsic, backbone, store, lambda e: None, tmp_path / "job")


@pytest.mark.slow
def test_prompt_tuning_smollm2_beats_zero_shot(smollm2_dir, tmp_path):
    """A tenant's job on the real backbone: made-up words -> yes/no is near chance for SmolLM2, which
    zero-shot answers in its own words; a short prompt-tuning job learns the task's answers."""
    from prefixserve.training.backbone import load_training_backbone
    from prefixserve.training.tasks import build_task

    backbone = load_training_backbone(ModelConfig(source=str(smollm2_dir)))
    task = build_task("made_up_yes_no")
    job = parse_job_spec({"task": "acme/yes-no", "kind": "prompt", "examples": task.train,
                          "eval_examples": task.eval[:32],
                          "hyperparameters": {"steps": 60, "batch_size": 4, "learning_rate": 0.03,
                                              "num_virtual_tokens": 4, "eval_max_new_tokens": 3,
                                              "init_text": task.instruction}})
    events = []
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), record(events), tmp_path / "job")
    metrics = result.metrics
    assert events[-1].loss < events[0].loss / 2
    assert metrics["exact_match"] >= metrics["zero_shot_exact_match"] + 0.25, metrics
    assert metrics["label_accuracy"] >= metrics["exact_match"]
