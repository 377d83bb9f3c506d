"""The LoRA pool: ranks from one free list, unpadded; storage that grows with what is resident;
rows reused without an old adapter's values; a budget that cannot hold the largest rank refused."""

import pytest
import torch

from prefixserve.adapters_store.kinds import lora_features
from prefixserve.engine.lora_pool import INITIAL_ROWS, LoRAPool, bytes_per_row, pool_rows_for
from prefixserve.errors import ConfigError, EngineOverloadedError
from prefixserve.kernels.lora_meta import ZERO_ROW
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_llama_config


@pytest.fixture
def arch():
    return LlamaArch.from_hf_config(tiny_llama_config())


def weights(arch, rank, targets=("q_proj",), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(arch.num_layers):
        for t in targets:
            fan_in, fan_out = lora_features(arch)[t]
            out[(layer, t)] = (torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen))
    return out


def test_ranks_take_their_own_rows_and_come_back(arch):
    pool = LoRAPool(arch, max_rows=20, dtype=torch.float32, device=torch.device("cpu"))
    small, big = pool.load(weights(arch, 2), 0.5), pool.load(weights(arch, 16, seed=1), 2.0)
    assert small.rank == 2 and big.rank == 16 and pool.num_free_rows == 2
    assert ZERO_ROW not in small.rows + big.rows and not set(small.rows) & set(big.rows)
    a, b = pool.pools["q_proj"]
    w = weights(arch, 16, seed=1)
    for layer in range(arch.num_layers):
        torch.testing.assert_close(a[layer, list(big.rows)], w[(layer, "q_proj")][0])
        torch.testing.assert_close(b[layer, list(big.rows)], w[(layer, "q_proj")][1].T)
    with pytest.raises(EngineOverloadedError, match="2 free ranks of 20, the adapter needs 4"):
        pool.load(weights(arch, 4), 1.0)
    assert pool.num_free_rows == 2  # a refused load takes nothing
    pool.free(big)
    assert pool.num_free_rows == 18
    assert not pool.pools["q_proj"][0][:, ZERO_ROW].any()


def test_reused_rows_hold_no_old_values_for_targets_the_new_adapter_lacks(arch):
    pool = LoRAPool(arch, max_rows=4, dtype=torch.float32, device=torch.device("cpu"))
    old = pool.load(weights(arch, 4, targets=("q_proj", "v_proj")), 1.0)
    pool.free(old)
    new = pool.load(weights(arch, 4, targets=("q_proj",), seed=3), 1.0)
    assert set(new.rows) == set(old.rows)
    assert not pool.pools["v_proj"][0][:, list(new.rows)].any()
    assert not pool.pools["v_proj"][1][:, list(new.rows)].any()


def test_storage_grows_with_residents_up_to_the_budget(arch):
    pool = LoRAPool(arch, max_rows=INITIAL_ROWS * 3, dtype=torch.float32, device=torch.device("cpu"))
    first = pool.load(weights(arch, 8), 1.0)
    assert pool.pools["q_proj"][0].shape[1] == 1 + INITIAL_ROWS and "k_proj" not in pool.pools
    allocations = [pool.load(weights(arch, 64, seed=i), 1.0) for i in range(5)]  # 328 rows
    assert pool.pools["q_proj"][0].shape[1] == 1 + 2 * INITIAL_ROWS
    w = weights(arch, 8)
    torch.testing.assert_close(pool.pools["q_proj"][0][0, list(first.rows)], w[(0, "q_proj")][0])  # kept
    allocations += [pool.load(weights(arch, 64, seed=9), 1.0) for _ in range(6)]  # 712 rows: capped at 768
    assert pool.pools["q_proj"][0].shape[1] == 1 + 3 * INITIAL_ROWS


def test_budget_must_hold_the_largest_rank(arch):
    per_row = bytes_per_row(arch, torch.float32)
    assert pool_rows_for(arch, torch.float32, 100 * per_row + 5, max_rank=64) == 100
    with pytest.raises(ConfigError, match="holds 10 ranks.*max_lora_rank = 64"):
        pool_rows_for(arch, torch.float32, 10 * per_row, max_rank=64)
