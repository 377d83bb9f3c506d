"""A library upgrade that makes the backbone ignore an adapter fails the job loudly, naming the
installed versions, and publishes nothing (transformers 5.24 with peft 0.21 silently dropped prefixes)."""

from dataclasses import replace

import pytest
import torch
from test_worker import EXAMPLES, TASK, make_spec

from prefixserve.errors import TrainingFailedError
from prefixserve.training.adapter_guard import library_versions, loss_ignores
from prefixserve.training.queue import JobStatus
from prefixserve.training.sqlite_queue import SqliteJobQueue
from prefixserve.training.worker import Worker


def ignore_virtual_tokens(model):
    """What the break looked like from inside the backbone: the prefix's keys and values (or a soft
    prompt's embeddings) never arrive. Returns a forward that drops them and trims the attention mask
    peft lengthened for them."""
    original = model.forward

    def forward(*args, **kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is not None and mask is not None:
            kwargs["attention_mask"] = mask[:, -input_ids.shape[1]:]
        return original(*args, **kwargs)
    return forward


def test_the_guard_tells_a_parameter_the_loss_ignores_and_restores_it():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    before, rng = weight.detach().clone(), torch.random.get_rng_state()
    assert not loss_ignores([weight], lambda: weight.sum())
    assert torch.equal(weight, before)
    assert loss_ignores([weight], lambda: torch.tensor(1.0))
    assert torch.equal(weight, before) and torch.equal(torch.random.get_rng_state(), rng)
    assert not loss_ignores([weight], lambda: torch.tensor(float("nan")))  # divergence, reported by training


@pytest.mark.parametrize(("init", "expected"), [
    ("random", "expected the prefix adapter to change the backbone's output"),
    ("text", "expected the backbone to fill a cache of 2 layers with the prefix text's keys and values, found 0"),
])
def test_a_prefix_the_forward_ignores_fails_the_job_and_nothing_is_published(tiny_training_backbone, tmp_path,
                                                                              monkeypatch, init, expected):
    from prefixserve.adapters_store.local_store import LocalStore

    monkeypatch.setattr(tiny_training_backbone.model, "forward", ignore_virtual_tokens(tiny_training_backbone.model))
    store = LocalStore(tmp_path / "store")
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    spec = make_spec(kind="prefix")
    hp = replace(spec.hyperparameters, init=init, init_text="Say whether the review is positive or negative.")
    job = queue.submit(replace(spec, hyperparameters=hp), "default")
    Worker(queue, store, tiny_training_backbone, tmp_path / "work", "w1", block_s=0.0).run(max_jobs=1)
    record = queue.get(job.id)
    assert record.status == JobStatus.FAILED and record.error["type"] == "training_failed"
    message = record.error["message"]
    assert expected in message
    assert library_versions() in message and "transformers " in message and "peft " in message
    assert store.current(TASK) is None and store.list_tasks() == {}
    assert record.progress is None or not record.progress.get("step")  # refused before the first step
    queue.close()
    store.close()


def test_a_soft_prompt_the_forward_ignores_fails_ipt_training(tiny_training_backbone, monkeypatch):
    from prefixserve.training import ipt
    from prefixserve.training.data import encode_examples

    inner = tiny_training_backbone.model.model
    forward = type(inner).forward

    def embeddings_never_arrive(*args, inputs_embeds=None, **kwargs):
        return forward(inner, *args, inputs_embeds=torch.zeros_like(inputs_embeds), **kwargs)
    monkeypatch.setattr(inner, "forward", embeddings_never_arrive)
    batch = encode_examples(tiny_training_backbone.tokenizer, EXAMPLES[:2], 32)
    prompt = torch.randn(3, tiny_training_backbone.arch.hidden_size)
    with pytest.raises(TrainingFailedError, match="expected the soft prompt to change the backbone's output"):
        ipt._require_soft_prompt_is_used(tiny_training_backbone, prompt, batch)


def test_a_reference_that_ignores_its_adapter_fails_as_reference_broken(tiny_training_backbone, monkeypatch):
    from adapter_cases import CAUSAL, require_reference_uses_adapter
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_training_backbone.model, PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=3))
    require_reference_uses_adapter(model, [5, 6, 7])  # a working reference passes
    monkeypatch.setattr(tiny_training_backbone.model, "forward", ignore_virtual_tokens(tiny_training_backbone.model))
    with pytest.raises(pytest.fail.Exception, match="reference broken: PeftModel ignores its PREFIX_TUNING adapter"):
        require_reference_uses_adapter(model, [5, 6, 7])
