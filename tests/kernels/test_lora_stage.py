"""The LoRA stage: decode groups read adapters kept across steps instead of gathering them, with the
same result bit for bit as the gather path, whatever arrives, leaves, is evicted and reloaded into
the same rows, or adds a target; a step copies only what changed; the byte budget holds."""

from functools import partial

import numpy as np
import pytest
import torch

from prefixserve.adapters_store.kinds import lora_features
from prefixserve.engine.lora_pool import LoRAPool
from prefixserve.kernels.lora_grouped import add_lora_grouped, plan_groups, plan_staged_groups
from prefixserve.kernels.lora_meta import lora_batch_metadata
from prefixserve.kernels.lora_stage import LoRAStage
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_llama_config

ARCH = LlamaArch.from_hf_config(tiny_llama_config())


def lora_weights(rank, targets, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(ARCH.num_layers):
        for target in targets:
            fan_in, fan_out = lora_features(ARCH)[target]
            out[(layer, target)] = (torch.randn(rank, fan_in, generator=gen) / 4,
                                    torch.randn(fan_out, rank, generator=gen) / 4)
    return out


class Fleet:
    """Adapters loaded into a real LoRAPool (rows scattered, reused after a free)."""

    def __init__(self, max_rows=200):
        self.pool = LoRAPool(ARCH, max_rows, torch.float32, torch.device("cpu"))
        self.adapters = {}  # name -> (allocation, weights)

    def load(self, name, rank, targets=("q_proj", "v_proj"), seed=None):
        weights = lora_weights(rank, targets, seed if seed is not None else hash(name) % 1000)
        self.adapters[name] = (self.pool.load(weights, 0.5 + rank / 16), weights)

    def evict(self, name):
        self.pool.free(self.adapters.pop(name)[0])

    def step(self, names, stage, target="q_proj", layer=1, tokens_per_adapter=1, seed=0):
        """One decode-like step over the named adapters (and two plain rows): the output with the
        stage, the output gathering, and the per-token reference."""
        segments = [s for s in range(len(names)) for _ in range(tokens_per_adapter)] + [-1, -1]
        order = torch.randperm(len(segments), generator=torch.Generator().manual_seed(seed)).numpy()
        token_segment = np.array(segments)[order]
        allocations = [self.adapters[n][0] for n in names]
        meta = lora_batch_metadata(token_segment, [a.rows for a in allocations], [a.scaling for a in allocations],
                                   torch.device("cpu"))
        fan_in, fan_out = lora_features(ARCH)[target]
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = torch.randn(len(segments), fan_in, generator=gen), torch.randn(len(segments), fan_out, generator=gen)
        a, b = self.pool.pools[target]
        gathered = y.clone()
        add_lora_grouped(x, gathered, a[layer], b[layer], meta, plan_groups(meta))
        plan = plan_staged_groups(meta, stage, self.pool.pools, [al.serial for al in allocations])
        staged = y.clone()
        add_lora_grouped(x, staged, a[layer], b[layer], meta, plan, partial(stage.views, target, layer))
        reference = y.clone()
        for t, s in enumerate(token_segment):
            if s >= 0:
                allocation, weights = self.adapters[names[s]]
                if (layer, target) in weights:
                    wa, wb = weights[(layer, target)]
                    reference[t] += allocation.scaling * (x[t] @ wa.T @ wb.T)
        return plan, staged, gathered, reference


def check(plan, staged, gathered, reference, expect_staged=True):
    assert all(g.staged for g in plan.groups) == expect_staged
    assert torch.equal(staged, gathered)  # the same bmm on the same values, only read from elsewhere
    torch.testing.assert_close(staged, reference, atol=1e-5, rtol=1e-5)


def test_a_changing_decode_batch_matches_the_gather_path_step_after_step():
    fleet, stage = Fleet(), LoRAStage(max_bytes=1 << 30)
    for i, rank in enumerate([8, 8, 3, 5, 16, 8, 2, 8, 2]):
        fleet.load(f"a{i}", rank)
    steps = [["a0", "a1", "a2", "a3"],  # ranks 8, 8, 3, 5: one bucket of 8
             ["a3", "a0", "a2", "a1"],  # same set, another order
             ["a0", "a2", "a5"],  # a1, a3 leave, a5 arrives
             ["a4", "a5", "a6", "a7", "a0", "a2", "a1"],  # rank 16 in its own bucket; the bucket of 8 grows
             ["a7"],  # all but the last slot leave: a7 moves down
             ["a8"]]  # a new rank 2 takes the slot rank-8 a7 held: the ranks past 2 must read as zeros
    for seed, names in enumerate(steps):
        check(*fleet.step(names, stage, seed=seed))


def test_rows_freed_and_reused_by_another_adapter_never_serve_the_old_weights():
    fleet, stage = Fleet(max_rows=16), LoRAStage(max_bytes=1 << 30)
    fleet.load("old", 8, seed=1)
    fleet.load("other", 8, seed=2)
    check(*fleet.step(["old", "other"], stage))
    rows = fleet.adapters["old"][0].rows
    fleet.evict("old")
    fleet.load("new", 8, seed=3)  # the only free rows: the old adapter's
    assert fleet.adapters["new"][0].rows == rows
    check(*fleet.step(["new", "other"], stage, seed=1))


def test_a_target_added_to_the_pool_restages_what_was_staged():
    fleet, stage = Fleet(), LoRAStage(max_bytes=1 << 30)
    fleet.load("qv", 8, targets=("q_proj", "v_proj"))
    check(*fleet.step(["qv"], stage, target="v_proj"))
    fleet.load("ko", 8, targets=("k_proj", "o_proj"))  # the pool gains k_proj and o_proj
    for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
        check(*fleet.step(["qv", "ko"], stage, target=target))


def test_a_step_copies_only_the_adapters_new_to_the_stage(monkeypatch):
    fleet, stage = Fleet(), LoRAStage(max_bytes=1 << 30)
    for i in range(6):
        fleet.load(f"a{i}", 8)
    copies = []
    original = LoRAStage._copy_in
    monkeypatch.setattr(LoRAStage, "_copy_in", staticmethod(lambda *args: copies.append(args[3]) or original(*args)))
    fleet.step(["a0", "a1", "a2", "a3"], stage)
    assert len(copies) == 4
    copies.clear()
    check(*fleet.step(["a1", "a2", "a3", "a4", "a0"], stage, seed=1))  # one arrives
    assert copies == [fleet.adapters["a4"][0].serial]
    copies.clear()
    check(*fleet.step(["a2", "a5", "a4", "a0"], stage, seed=2))  # a1 and a3 leave, a5 arrives
    assert copies == [fleet.adapters["a5"][0].serial]


@pytest.mark.parametrize("budget_slots", [0, 3])
def test_a_group_over_the_byte_budget_is_gathered_and_the_budget_holds(budget_slots):
    fleet = Fleet()
    for i in range(4):
        fleet.load(f"a{i}", 8)
    per_slot = sum(8 * a.shape[0] * (a.shape[2] + b.shape[2]) * 4 for a, b in fleet.pool.pools.values())
    stage = LoRAStage(max_bytes=budget_slots * per_slot)
    check(*fleet.step(["a0", "a1", "a2", "a3"], stage), expect_staged=False)
    assert stage.bytes_allocated <= stage.max_bytes
    if budget_slots:
        check(*fleet.step(["a0", "a1", "a2"], stage, seed=1))  # three fit exactly, with no doubling slack
        assert stage.bytes_allocated == 3 * per_slot
