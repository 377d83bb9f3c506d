"""The vector pool (IA3's scales): one row per task in every (mode, target) pool, identity in row 0
and in whatever a task leaves alone, storage that grows by doubling, a full pool refused as
overload; and the step op that applies it touches only its tasks' tokens."""

import pytest
import torch

from prefixserve.adapters_store.kinds import lora_features
from prefixserve.engine.vector_pool import IDENTITY_ROW, INITIAL_ROWS, VectorPool
from prefixserve.errors import EngineOverloadedError
from prefixserve.models.llama import LlamaArch, VectorStep
from prefixserve.models.tiny import tiny_llama_config

CPU = torch.device("cpu")


@pytest.fixture
def arch():
    return LlamaArch.from_hf_config(tiny_llama_config())


def ia3_vectors(arch, seed=0, targets=(("k_proj", "scale_out"), ("down_proj", "scale_in"))):
    gen = torch.Generator().manual_seed(seed)
    features = lora_features(arch)
    return {(layer, target, mode): 1 + torch.randn(features[target][mode == "scale_out"], generator=gen)
            for layer in range(arch.num_layers) for target, mode in targets}


def test_a_task_takes_one_row_in_every_pool_and_gives_it_back(arch):
    pool = VectorPool(arch, max_rows=2, device=CPU)
    first, second = pool.load(ia3_vectors(arch)), pool.load(ia3_vectors(arch, seed=1))
    assert {first.row, second.row} == {1, 2} and IDENTITY_ROW not in (first.row, second.row)
    vectors = ia3_vectors(arch, seed=1)
    for layer in range(arch.num_layers):
        torch.testing.assert_close(pool.pools[("scale_in", "down_proj")][layer, second.row],
                                   vectors[(layer, "down_proj", "scale_in")], rtol=0, atol=0)
    assert pool.pools[("scale_in", "down_proj")][:, IDENTITY_ROW].eq(1).all()
    with pytest.raises(EngineOverloadedError, match="2 rows are all held"):
        pool.load(ia3_vectors(arch, seed=2))
    pool.free(first)
    assert pool.load(ia3_vectors(arch, seed=2)).row == first.row


def test_a_reused_row_holds_identity_where_the_new_task_has_no_vector(arch):
    pool = VectorPool(arch, max_rows=4, device=CPU)
    old = pool.load(ia3_vectors(arch))
    pool.free(old)
    only_v = {(0, "v_proj", "scale_out"): torch.full((lora_features(arch)["v_proj"][1],), 2.0)}
    new = pool.load(only_v)
    assert new.row == old.row
    assert pool.pools[("scale_out", "k_proj")][:, new.row].eq(1).all()  # the old task's k scales are gone
    assert pool.pools[("scale_in", "down_proj")][:, new.row].eq(1).all()
    assert pool.pools[("scale_out", "v_proj")][1, new.row].eq(1).all()  # a layer the task leaves alone


def test_storage_grows_by_doubling_and_keeps_what_it_holds(arch):
    pool = VectorPool(arch, max_rows=INITIAL_ROWS * 3, device=CPU)
    held = [pool.load(ia3_vectors(arch, seed=i)) for i in range(INITIAL_ROWS + 1)]
    assert pool.capacity == 2 * INITIAL_ROWS
    assert pool.pools[("scale_out", "k_proj")].shape[1] == 1 + 2 * INITIAL_ROWS
    torch.testing.assert_close(pool.pools[("scale_out", "k_proj")][0, held[0].row],
                               ia3_vectors(arch, seed=0)[(0, "k_proj", "scale_out")], rtol=0, atol=0)
    assert pool.bytes_allocated == sum(p.nbytes for p in pool.pools.values())


def test_the_step_op_touches_only_its_tasks_tokens():
    # pools: one target, 3 rows (identity, task a, task b), 4 output features; tokens 1 and 3 are tasks'
    scale = torch.ones(1, 3, 4)
    scale[0, 1], scale[0, 2] = 2.0, 0.5
    shift = torch.zeros(1, 3, 4)
    shift[0, 2] = 1.0
    step = VectorStep({("scale_out", "o_proj"): scale, ("shift_out", "o_proj"): shift},
                      token_indices=torch.tensor([1, 3]), token_rows=torch.tensor([1, 2]))
    y = torch.arange(16, dtype=torch.float32).view(4, 4)
    before = y.clone()
    step.apply_output(0, "o_proj", y)
    torch.testing.assert_close(y[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(y[1], before[1] * 2, rtol=0, atol=0)
    torch.testing.assert_close(y[3], before[3] * 0.5 + 1, rtol=0, atol=0)
    x = torch.ones(4, 4)
    assert step.scale_input(0, "o_proj", x) is x  # no input scales for o_proj: nothing copied
