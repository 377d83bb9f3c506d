"""Adapters inside the engine: IPT decoding, shared prefix pages, version pinning, refusals."""

from collections import Counter

import pytest
import torch
from helpers import random_prompts

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine import adapters as adapters_module
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.lora_pool import bytes_per_row
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import AdapterError, InvalidRequestError, TaskNotFoundError

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=True)


def room_for_two_rank2_loras(backbone) -> dict:
    """A LoRA pool of 4 ranks: two rank-2 adapters resident at once, a third must wait or evict."""
    dtype = next(backbone.model.parameters()).dtype
    return dict(adapters=AdapterLimits(max_lora_rank=2), lora_memory_bytes=4 * bytes_per_row(backbone.arch, dtype))


@pytest.fixture
def engine(tiny_backbone):
    return LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64),
                                                 **room_for_two_rank2_loras(tiny_backbone)))


def artifact(engine, kind, config, tensors):
    return encode_artifact(kind, config, tensors, engine.adapters.fingerprint)


def prefix_artifact(engine, num_tokens, seed):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(seed)
    shape = (a.num_layers, num_tokens, a.num_kv_heads, a.head_dim)
    return artifact(engine, "prefix", {"num_virtual_tokens": num_tokens},
                    {"keys": torch.randn(shape, generator=g), "values": torch.randn(shape, generator=g)})


def lora_artifact(engine, seed, rank=2):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(seed)
    q_out = a.num_heads * a.head_dim
    tensors = {f"layers.{i}.q_proj.lora_a": torch.randn(rank, a.hidden_size, generator=g) for i in range(a.num_layers)}
    tensors |= {f"layers.{i}.q_proj.lora_b": torch.randn(q_out, rank, generator=g) for i in range(a.num_layers)}
    return artifact(engine, "lora", {"rank": rank, "alpha": 4.0, "use_rslora": False, "targets": ["q_proj"]}, tensors)


def ia3_artifact(engine, seed):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.v_proj.ia3": 1 + torch.randn(a.num_kv_heads * a.head_dim, generator=g)
               for i in range(a.num_layers)}
    tensors |= {f"layers.{i}.down_proj.ia3": 1 + torch.randn(a.intermediate_size, generator=g)
                for i in range(a.num_layers)}
    return artifact(engine, "ia3", {"targets": ["down_proj", "v_proj"], "feedforward": ["down_proj"]}, tensors)


def bottleneck_artifact(engine, seed, size=8):
    """Houlsby placements in every layer, tensors ~ N(0, 0.3)."""
    g, hidden = torch.Generator().manual_seed(seed), engine.backbone.arch.hidden_size
    tensors = {}
    for i in range(engine.backbone.arch.num_layers):
        for placement in ("attention", "mlp"):
            stem = f"layers.{i}.{placement}"
            tensors |= {f"{stem}.down": 0.3 * torch.randn(size, hidden, generator=g),
                        f"{stem}.down_bias": 0.3 * torch.randn(size, generator=g),
                        f"{stem}.up": 0.3 * torch.randn(hidden, size, generator=g),
                        f"{stem}.up_bias": 0.3 * torch.randn(hidden, generator=g)}
    return artifact(engine, "adapter", {"size": size, "placements": ["attention", "mlp"], "activation": "silu"},
                    tensors)


def run(engine, prompt, task):
    return engine.generate([prompt], GREEDY, tasks=[task])[0]


def test_intrinsic_serves_exactly_the_decoded_soft_prompt(engine):
    a = engine.backbone.arch
    g = torch.Generator().manual_seed(0)
    d, hidden_dec, num_tokens = 5, 32, 4
    decoder = {"decoder.0.weight": torch.randn(hidden_dec, d, generator=g) * 0.3,
               "decoder.0.bias": torch.randn(hidden_dec, generator=g) * 0.1,
               "decoder.2.weight": torch.randn(num_tokens * a.hidden_size, hidden_dec, generator=g) * 0.3,
               "decoder.2.bias": torch.randn(num_tokens * a.hidden_size, generator=g) * 0.1}
    subspace_config = {"intrinsic_dim": d, "num_virtual_tokens": num_tokens, "decoder_hidden": hidden_dec}
    subspace = engine.register_adapter("ipt-subspace", artifact(engine, "subspace", subspace_config, decoder))
    z = torch.randn(d, generator=g)
    engine.register_adapter("ipt-task", artifact(engine, "intrinsic", {"subspace_version": subspace.version},
                                                 {"z": z}))
    soft_prompt = get_kind("subspace").decode(decoder, z, subspace_config)  # [P, hidden]
    engine.register_adapter("as-prompt", artifact(engine, "prompt", {"num_virtual_tokens": num_tokens},
                                                  {"embeddings": soft_prompt}))
    prompt = random_prompts([7], seed=1)[0]
    ipt, reference, plain = run(engine, prompt, "ipt-task"), run(engine, prompt, "as-prompt"), run(engine, prompt, None)
    assert ipt.token_ids == reference.token_ids and ipt.logprobs == reference.logprobs
    assert ipt.logprobs != plain.logprobs  # the soft prompt really steers the model
    with pytest.raises(InvalidRequestError, match="subspace"):
        engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="ipt-subspace")


def test_intrinsic_without_its_subspace_is_refused(engine):
    data = artifact(engine, "intrinsic", {"subspace_version": "ab" * 32}, {"z": torch.randn(5)})
    free = engine.pages.num_free_pages
    with pytest.raises(AdapterError, match="not registered"):
        engine.register_adapter("lonely", data)
    assert engine.adapters.tasks() == {} and engine.pages.num_free_pages == free


def test_requests_of_one_prefix_task_share_one_copy(engine):
    engine.register_adapter("shared", prefix_artifact(engine, num_tokens=20, seed=2))
    (handle,) = engine.adapters.resident.values()
    assert len(handle.prefix_pages) == 2 and [engine.pages.ref_count(p) for p in handle.prefix_pages] == [1, 1]
    requests = [engine.add_request(prompt_token_ids=p, params=GREEDY, task="shared")
                for p in random_prompts([3, 5, 8, 13, 21], seed=3)]
    engine.step()
    assert [engine.pages.ref_count(p) for p in handle.prefix_pages] == [6, 6]  # the manager + 5 requests
    used_by_requests = sum(len(r.page_ids) for r in requests)
    assert engine.pages.num_free_pages == engine.pages.num_pages - 2 - used_by_requests
    while engine.has_unfinished():
        engine.step()
    assert [engine.pages.ref_count(p) for p in handle.prefix_pages] == [1, 1]
    engine.unregister_adapter("shared")
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_running_request_keeps_its_version_across_a_reupload(engine):
    prompt = random_prompts([6], seed=4)[0]
    v1, v2 = prefix_artifact(engine, 5, seed=10), prefix_artifact(engine, 9, seed=11)
    engine.register_adapter("task", v1)
    v1_alone = run(engine, prompt, "task")
    engine.register_adapter("task", v2)
    v2_alone = run(engine, prompt, "task")
    assert v1_alone.token_ids != v2_alone.token_ids or v1_alone.logprobs != v2_alone.logprobs

    engine.register_adapter("task", v1)
    old = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="task")
    engine.step()
    engine.register_adapter("task", v2)  # hot swap while `old` is running
    new = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="task")
    assert len(engine.adapters.resident) == 2  # v1 stays while its request runs
    while engine.has_unfinished():
        engine.step()
    assert old.output_token_ids == v1_alone.token_ids  # batched with `new`, so logprobs agree to float noise
    assert torch.allclose(torch.tensor(old.logprobs), torch.tensor(v1_alone.logprobs), atol=1e-5)
    assert new.output_token_ids == v2_alone.token_ids
    assert len(engine.adapters.resident) == 1  # v1 freed with its last request


def test_unknown_task_and_bad_bytes_leave_no_state(engine):
    with pytest.raises(TaskNotFoundError, match="'missing' is not registered"):
        engine.add_request(prompt_token_ids=[5, 6], params=GREEDY, task="missing")
    free = engine.pages.num_free_pages
    with pytest.raises(AdapterError):
        engine.register_adapter("junk", b"definitely not safetensors")
    with pytest.raises(InvalidRequestError, match="task names"):
        engine.register_adapter("base", prefix_artifact(engine, 4, seed=5))
    assert engine.adapters.tasks() == {} and engine.pages.num_free_pages == free and not engine.has_unfinished()


def room_for_two_size32_bottlenecks() -> dict:
    """A bottleneck pool of 64 rows (4 sequences x 16): two size-32 adapters resident at once."""
    return dict(scheduler=SchedulerConfig(max_num_seqs=4), adapters=AdapterLimits(max_bottleneck_size=32))


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_an_adapter_waiting_for_pool_rows_is_not_starved_by_steady_traffic(tiny_backbone, kind, monkeypatch):
    """Room for two adapters in a row pool, which new requests keep busy every step: a third waits
    only the grace period, then new requests of one of the two are held back until it is resident;
    all are served."""
    monkeypatch.setattr(adapters_module, "ROW_WAIT_GRACE_S", 0.0)
    room, make = {"lora": (room_for_two_rank2_loras(tiny_backbone), lora_artifact),
                  "bottleneck": (room_for_two_size32_bottlenecks(),
                                 lambda engine, seed: bottleneck_artifact(engine, seed, size=32))}[kind]
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64), **room))
    for i, name in enumerate(("task-a", "task-b", "task-c")):
        engine.register_adapter(name, make(engine, seed=i))
    prompt = random_prompts([5], seed=6)[0]
    short = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    steady = [engine.add_request(prompt_token_ids=prompt, params=short, task=t) for t in ("task-b", "task-c")]
    engine.step()  # b and c hold the pool's rows
    starved = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="task-a")
    served_at = None
    for step in range(40):  # b and c keep arriving every step
        steady += [engine.add_request(prompt_token_ids=prompt, params=short, task=t) for t in ("task-b", "task-c")]
        engine.step()
        if served_at is None and starved.num_output_tokens:
            served_at = step
    assert served_at is not None and served_at < 20, served_at  # without holding back, it never gets rows
    while engine.has_unfinished():
        engine.step()
    assert starved.output_token_ids == run(engine, prompt, "task-a").token_ids
    assert all(r.num_output_tokens == 4 for r in steady)
    engine.close()


def test_only_the_least_used_lora_drains_for_a_waiting_one(tiny_backbone, monkeypatch):
    """Room for two rank-2 LoRAs: b with three requests, c with one, a waiting. Only c's new
    requests wait (c holds the fewest, and its rows are enough); b's keep being served at once."""
    monkeypatch.setattr(adapters_module, "ROW_WAIT_GRACE_S", 0.0)
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64),
                                                   **room_for_two_rank2_loras(tiny_backbone)))
    for i, name in enumerate(("lora-a", "lora-b", "lora-c")):
        engine.register_adapter(name, lora_artifact(engine, seed=i))
    prompt = random_prompts([5], seed=6)[0]
    long = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    running = [engine.add_request(prompt_token_ids=prompt, params=long, task=t)
               for t in ("lora-b", "lora-b", "lora-b", "lora-c")]
    engine.step()
    waiting = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="lora-a")
    engine.step()  # a finds no free rows: c is chosen to drain
    later_b = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="lora-b")
    later_c = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="lora-c")
    assert not later_b.adapter_pending and later_c.adapter_pending
    while engine.has_unfinished():
        engine.step()
    assert all(r.num_output_tokens == r.params.max_new_tokens for r in [*running, waiting, later_b, later_c])
    engine.close()


def test_lora_pool_is_a_device_cache(engine):
    """Room for two, three LoRA tasks: idle adapters are evicted (least recently used first); while
    running requests hold the whole pool, a request for the third waits and is served when one frees."""
    for i, name in enumerate(("lora-a", "lora-b", "lora-c")):
        engine.register_adapter(name, lora_artifact(engine, seed=i))
    prompt = random_prompts([5], seed=6)[0]
    alone = {name: run(engine, prompt, name) for name in ("lora-a", "lora-b", "lora-c")}
    assert len({tuple(c.logprobs) for c in alone.values()} | {tuple(run(engine, prompt, None).logprobs)}) == 4

    long = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    pinned = [engine.add_request(prompt_token_ids=prompt, params=long, task=name) for name in ("lora-b", "lora-c")]
    engine.step()
    waiting = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task="lora-a")
    for _ in range(5):
        engine.step()
        assert waiting.adapter_pending and waiting.num_output_tokens == 0  # the pool's rows are all in use
    while engine.has_unfinished():
        engine.step()
    assert all(r.num_output_tokens == 30 for r in pinned)
    assert waiting.output_token_ids == alone["lora-a"].token_ids


def check_pool_is_a_device_cache(engine, names, make_artifact) -> None:
    """Three tasks of one kind, the pool holding two: idle ones are evicted, and while pinned requests
    hold the pool a request for the third waits, then is served exactly as alone."""
    for i, name in enumerate(names):
        engine.register_adapter(name, make_artifact(engine, seed=i))
    prompt = random_prompts([5], seed=6)[0]
    alone = {name: run(engine, prompt, name) for name in names}
    assert len({tuple(c.logprobs) for c in alone.values()} | {tuple(run(engine, prompt, None).logprobs)}) == 4
    assert engine.adapters.device.evictions >= 1

    long = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    pinned = [engine.add_request(prompt_token_ids=prompt, params=long, task=name) for name in names[1:]]
    engine.step()
    waiting = engine.add_request(prompt_token_ids=prompt, params=GREEDY, task=names[0])
    for _ in range(5):
        engine.step()
        assert waiting.adapter_pending and waiting.num_output_tokens == 0  # the pool is all pinned
    while engine.has_unfinished():
        engine.step()
    assert all(r.num_output_tokens == 12 for r in pinned)
    assert waiting.output_token_ids == alone[names[0]].token_ids


def test_vector_pool_is_a_device_cache(tiny_backbone):
    """IA3 tasks take a row each of a pool sized at twice max_num_seqs (here 2); no row leaks."""
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64),
                                                   scheduler=SchedulerConfig(max_num_seqs=1)))
    assert engine.runner.vector_pool.max_rows == 2
    check_pool_is_a_device_cache(engine, ("ia3-a", "ia3-b", "ia3-c"), ia3_artifact)
    resident = sum(h.vectors is not None for h in engine.adapters.device.resident.values())
    assert engine.runner.vector_pool.num_free_rows + resident == 2


def test_bottleneck_pool_is_a_device_cache(tiny_backbone):
    """Bottleneck adapters take their size in rows of a pool bounded at max_num_seqs adapters of size
    16 (here 16 rows: two of size 8); no row leaks."""
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=64),
                                                   scheduler=SchedulerConfig(max_num_seqs=1),
                                                   adapters=AdapterLimits(max_bottleneck_size=8)))
    pool = engine.runner.bottleneck_pool
    assert pool.max_rows == 16
    check_pool_is_a_device_cache(engine, ("adapter-a", "adapter-b", "adapter-c"), bottleneck_artifact)
    resident = sum(h.bottleneck.size for h in engine.adapters.device.resident.values() if h.bottleneck)
    assert pool.num_free_rows + resident == 16


def test_weighted_tenant_shares_hold_while_loras_drain_and_evict(tiny_backbone, monkeypatch):
    """Two tenants (weights 2:1), three LoRAs each, room for two at a time: requests keep waiting for
    rows, LoRAs drain and are evicted, yet while both tenants have requests waiting each gets its
    weight's share of the tokens (within 15 %; ignoring weights would be 25 % off), and every request
    is served in full."""
    monkeypatch.setattr(adapters_module, "ROW_WAIT_GRACE_S", 0.0)
    engine = LLMEngine(tiny_backbone, EngineConfig(cache=CacheConfig(num_pages=128),
                                                   scheduler=SchedulerConfig(max_num_seqs=4),
                                                   **room_for_two_rank2_loras(tiny_backbone)))
    weights, counts = {"heavy": 2.0, "light": 1.0}, {"heavy": 40, "light": 20}
    for t, tenant in enumerate(weights):
        for i in range(3):
            engine.register_adapter(f"{tenant}-lora{i}", lora_artifact(engine, seed=10 * t + i))
    prompt = random_prompts([5], seed=6)[0]
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    tenant_of = {}
    for k in range(max(counts.values())):  # interleaved, so neither tenant arrives first
        for tenant, weight in weights.items():
            if k < counts[tenant]:
                r = engine.add_request(prompt_token_ids=prompt, params=params, task=f"{tenant}-lora{k % 3}",
                                       tenant=tenant, tenant_weight=weight)
                tenant_of[r.request_id] = r
    served, steps = Counter(), 0
    while engine.has_unfinished():
        backlogged = {r.tenant for r in engine.scheduler.waiting}
        outputs = engine.step()
        steps += 1
        assert steps < 2000
        if backlogged == set(weights):
            for out in outputs:
                served[tenant_of[out.request_id].tenant] += len(out.new_token_ids)
    assert all(r.num_output_tokens == 4 for r in tenant_of.values())
    assert engine.adapters.device_evictions > 0  # the pool really churned
    total = sum(served.values())
    assert total >= 0.5 * 4 * sum(counts.values()), served  # the window covers most of the run
    for tenant, weight in weights.items():
        assert abs(served[tenant] / total / (weight / sum(weights.values())) - 1) <= 0.15, served
    engine.close()
