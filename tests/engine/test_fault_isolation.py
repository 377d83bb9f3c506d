"""One tenant's task version can never stop the engine for the others: a version that fails while it is
compiled or run ends only its own requests (and is quarantined); only a broken engine stops."""

from concurrent import futures

import pytest
import torch
from helpers import random_prompts

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig
from prefixserve.engine.adapters import AdapterManager
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.lora_pool import bytes_per_row
from prefixserve.engine.request import RequestStatus, SamplingParams
from prefixserve.errors import AdapterError, AdapterFailedError, InvalidRequestError

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def room_for_two_rank2_loras(backbone) -> dict:
    """A LoRA pool of 4 ranks: two rank-2 adapters resident at once, a third must wait or evict."""
    dtype = next(backbone.model.parameters()).dtype
    return dict(adapters=AdapterLimits(max_lora_rank=2), lora_memory_bytes=4 * bytes_per_row(backbone.arch, dtype))


@pytest.fixture
def engine(tiny_backbone):
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64),
                                                 **room_for_two_rank2_loras(tiny_backbone)))
    yield engine
    engine.close()


def prompt_artifact(engine, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, engine.backbone.arch.hidden_size, generator=g) * scale
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, engine.adapters.fingerprint)


def lora_artifact(engine, seed, alpha=4.0):
    a, rank = engine.backbone.arch, 2
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.q_proj.lora_a": torch.randn(rank, a.hidden_size, generator=g) for i in range(a.num_layers)}
    tensors |= {f"layers.{i}.q_proj.lora_b": torch.randn(a.num_heads * a.head_dim, rank, generator=g)
                for i in range(a.num_layers)}
    config = {"rank": rank, "alpha": alpha, "use_rslora": False, "targets": ["q_proj"]}
    return encode_artifact("lora", config, tensors, engine.adapters.fingerprint)


def run_mixed(engine, tasks, prompts):
    """Add one request per (task, prompt) at once and step until all end; returns the requests and the
    error each ended with (None for none)."""
    requests = [engine.add_request(prompt_token_ids=p, params=GREEDY, task=t) for t, p in zip(tasks, prompts)]
    errors = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.error is not None:
                errors[output.request_id] = output.error
    return requests, [errors.get(r.request_id) for r in requests]


def reference_tokens(engine, tasks, prompts):
    return [c.token_ids for c in engine.generate(prompts, GREEDY, tasks=tasks)]


def test_a_stored_lora_whose_scaling_overflows_fails_only_its_own_requests(engine):
    # The case: stored by a server that checked alpha in float64 only; 1e308 / rank is finite
    # there but overflows the slots' float32 scaling. It must not stop the step for the others.
    engine.register_adapter("good", prompt_artifact(engine, seed=1))
    engine.store.put("bad", lora_artifact(engine, seed=2, alpha=1e308), "lora")
    prompts = random_prompts([5, 7, 6, 8], seed=3)
    tasks = [None, "good", "bad", None]
    expected = reference_tokens(engine, [None, "good", None], [prompts[0], prompts[1], prompts[3]])

    requests, errors = run_mixed(engine, tasks, prompts)

    assert isinstance(errors[2], AdapterError) and errors[2].status_code == 400
    assert "scaling (alpha 1e+308 / rank 2) to be finite in float32" in errors[2].message
    assert requests[2].status == RequestStatus.FINISHED_ERROR
    assert [requests[i].output_token_ids for i in (0, 1, 3)] == expected
    assert [errors[i] for i in (0, 1, 3)] == [None, None, None]
    assert engine.generate([prompts[0]], GREEDY)[0].token_ids == expected[0]  # later requests are served
    held_by_prefixes = sum(len(h.prefix_pages) for h in engine.adapters.resident.values())
    assert engine.pages.num_free_pages + held_by_prefixes == engine.pages.num_pages  # no request's pages leak


def test_a_version_whose_compile_raises_is_quarantined_and_the_others_go_on(engine, monkeypatch):
    engine.register_adapter("good", prompt_artifact(engine, seed=1))
    bad_version = engine.store.put("bad", prompt_artifact(engine, seed=2), "prompt")  # stored, not yet resident
    make_resident = AdapterManager._make_resident
    attempts = []

    def failing_for_bad(self, version, artifact=None):
        if version == bad_version:
            attempts.append(version)
            raise RuntimeError("device fault injected for one version")
        return make_resident(self, version, artifact)

    monkeypatch.setattr(AdapterManager, "_make_resident", failing_for_bad)
    prompts = random_prompts([6, 9, 5, 7], seed=4)
    tasks = [None, "bad", "good", "bad"]
    expected = reference_tokens(engine, [None, "good"], [prompts[0], prompts[2]])

    requests, errors = run_mixed(engine, tasks, prompts)

    assert [requests[0].output_token_ids, requests[2].output_token_ids] == expected
    for i in (1, 3):
        assert isinstance(errors[i], AdapterFailedError) and errors[i].status_code == 422
        assert bad_version in errors[i].message and "device fault injected" in errors[i].message
        assert "quarantined" in errors[i].message
    assert attempts == [bad_version]  # one try for both of its requests
    with pytest.raises(AdapterFailedError, match="quarantined"):  # later requests are refused at once
        engine.add_request(prompt_token_ids=prompts[1], params=GREEDY, task="bad")
    assert attempts == [bad_version]
    assert reference_tokens(engine, [None, "good"], [prompts[0], prompts[2]]) == expected


def test_a_step_that_fails_for_one_version_ends_only_its_requests(engine, monkeypatch):
    engine.register_adapter("good", prompt_artifact(engine, seed=1))
    engine.register_adapter("bad", lora_artifact(engine, seed=2))
    bad_version = engine.adapters.resolve("bad")
    prompts = random_prompts([6, 9, 5, 7], seed=5)
    tasks = [None, "bad", "good", "bad"]
    expected = reference_tokens(engine, [None, "good"], [prompts[0], prompts[2]])
    execute = engine.runner.execute

    def failing_with_bad(step):
        if any(r.task_version == bad_version for r in step.requests):
            raise RuntimeError("kernel fault injected for one version")
        return execute(step)

    monkeypatch.setattr(engine.runner, "execute", failing_with_bad)
    requests, errors = run_mixed(engine, tasks, prompts)

    assert [requests[0].output_token_ids, requests[2].output_token_ids] == expected
    assert errors[0] is None and errors[2] is None
    for i in (1, 3):
        assert isinstance(errors[i], AdapterFailedError) and "kernel fault injected" in errors[i].message
        assert requests[i].status == RequestStatus.FINISHED_ERROR
    with pytest.raises(AdapterFailedError):
        engine.add_request(prompt_token_ids=prompts[1], params=GREEDY, task="bad")
    assert engine.runner.lora_pool.num_free_rows == engine.runner.lora_pool.max_rows  # its rows were let go
    assert reference_tokens(engine, [None, "good"], [prompts[0], prompts[2]]) == expected


def test_a_step_that_fails_for_everyone_stops_the_engine(engine, monkeypatch):
    engine.register_adapter("good", prompt_artifact(engine, seed=1))

    def broken(step):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(engine.runner, "execute", broken)
    prompts = random_prompts([6, 5], seed=6)
    for task in ("good", None):
        engine.add_request(prompt_token_ids=prompts[0], params=GREEDY, task=task)
    with pytest.raises(RuntimeError, match="the device is gone"):  # the base part fails too: not a task's fault
        engine.step()


def test_an_upload_whose_compile_raises_stores_nothing(engine, monkeypatch):
    def broken(embeddings, page_ids):
        raise RuntimeError("compile fault injected")

    monkeypatch.setattr(engine.runner, "prefill_embeddings", broken)
    free = engine.pages.num_free_pages
    with pytest.raises(AdapterError, match="could not be compiled onto the device .*compile fault injected"):
        engine.register_adapter("faq", prompt_artifact(engine, seed=1))
    assert engine.store.current("faq") is None and engine.adapters.tasks() == {}
    assert engine.pages.num_free_pages == free


def test_an_intrinsic_whose_soft_prompt_overflows_is_refused_before_it_is_stored(engine):
    a, d, hidden_dec, num_tokens = engine.backbone.arch, 3, 8, 2
    # tanh(1) * 1e38 summed over 8 hidden units overflows float32, whatever z is
    decoder = {"decoder.0.weight": torch.zeros(hidden_dec, d), "decoder.0.bias": torch.ones(hidden_dec),
               "decoder.2.weight": torch.full((num_tokens * a.hidden_size, hidden_dec), 1e38),
               "decoder.2.bias": torch.zeros(num_tokens * a.hidden_size)}
    config = {"intrinsic_dim": d, "num_virtual_tokens": num_tokens, "decoder_hidden": hidden_dec}
    subspace = engine.register_adapter("subspace", encode_artifact("subspace", config, decoder,
                                                                   engine.adapters.fingerprint))
    intrinsic = encode_artifact("intrinsic", {"subspace_version": subspace.version}, {"z": torch.ones(d)},
                                engine.adapters.fingerprint)
    with pytest.raises(AdapterError, match="soft prompt decoded through subspace .* finite in float32"):
        engine.register_adapter("ist", intrinsic)
    assert engine.store.current("ist") is None


def test_max_new_tokens_beyond_the_context_is_refused_with_both_numbers(engine):
    limit = engine.max_model_len
    with pytest.raises(InvalidRequestError, match=rf"too large: {10**9}\. The context holds {limit} tokens and "
                                                  rf"the request has 3 prompt tokens, leaving room for at most "
                                                  rf"{limit - 3} new tokens"):
        engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=10**9))
    exact = engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=limit - 3,
                                                                                  ignore_eos=True, temperature=0))
    assert exact.params.max_new_tokens == limit - 3  # what fits exactly is accepted


def test_max_new_tokens_counts_the_tasks_virtual_tokens_even_when_not_yet_resident(engine):
    limit = engine.max_model_len
    engine.store.put("cold", prompt_artifact(engine, seed=1), "prompt")  # P = 4, learned only at pinning
    request = engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=limit - 3),
                                 task="cold")
    errors = {}
    while engine.has_unfinished():
        errors |= {o.request_id: o.error for o in engine.step() if o.error is not None}
    error = errors[request.request_id]
    assert isinstance(error, InvalidRequestError) and error.status_code == 400
    assert f"after the task's 4 virtual tokens, leaving room for at most {limit - 7} new tokens" in error.message
    with pytest.raises(InvalidRequestError, match="after the task's 4 virtual tokens"):  # resident now: at once
        engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=limit - 3), task="cold")


def test_no_max_new_tokens_runs_to_the_end_of_the_context_after_the_virtual_tokens(engine):
    engine.register_adapter("faq", prompt_artifact(engine, seed=1))
    params = SamplingParams(max_new_tokens=None, temperature=0, ignore_eos=True)
    done = engine.generate([[5, 6, 7]], params, tasks=["faq"])[0]
    assert done.finish_reason == "length" and len(done.token_ids) == engine.max_model_len - 4 - 3


def test_soft_prompts_loaded_together_share_one_prefill_and_a_failing_one_ends_only_its_requests(engine,
                                                                                                 monkeypatch):
    """Three prompt tasks found cold in one step are prefilled in one forward and serve what each
    compiled alone serves; one whose prefill comes out NaN fails its own requests, nobody else's,
    and leaks no page."""
    names = ["p0", "p1", "p2"]
    versions = {n: engine.store.put(n, prompt_artifact(engine, seed=10 + i), "prompt") for i, n in enumerate(names)}
    prompts = random_prompts([6, 9, 5, 7], seed=4)
    alone = LLMEngine(engine.backbone, engine.config)
    for n in names:
        alone.register_adapter(n, engine.store.get(versions[n]))  # compiled on its own, at upload
    expected = reference_tokens(alone, ["p0", "p2", None], [prompts[0], prompts[2], prompts[3]])
    alone.close()

    runner, batches = engine.runner, []
    prefill_batch = runner.prefill_embeddings_batch

    def poisoning_p1(items):
        batches.append(len(items))
        prefill_batch(items)
        p1_pages = engine.adapters.device.resident[versions["p1"]].prefix_pages
        runner.kv_cache[:, :, p1_pages[0], 0] = float("nan")  # as if its virtual tokens overflowed

    monkeypatch.setattr(runner, "prefill_embeddings_batch", poisoning_p1)
    requests = [engine.add_request(prompt_token_ids=p, params=GREEDY, task=t)
                for t, p in zip(["p0", "p1", "p2", None], prompts)]
    futures.wait(list(engine.adapters.loader._loading.values()))  # all three loads finish before one poll
    errors = {}
    while engine.has_unfinished():
        errors |= {o.request_id: o.error for o in engine.step() if o.error is not None}
    errors = [errors.get(r.request_id) for r in requests]

    assert batches == [3]
    assert [requests[i].output_token_ids for i in (0, 2, 3)] == expected
    assert isinstance(errors[1], AdapterError) and "finite keys and values" in errors[1].message
    assert versions["p1"] not in engine.adapters.resident
    held_by_prefixes = sum(len(h.prefix_pages) for h in engine.adapters.resident.values())
    assert engine.pages.num_free_pages + held_by_prefixes == engine.pages.num_pages
