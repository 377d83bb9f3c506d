"""The bottleneck pool: an adapter of size r takes r rows in every placement's pool and one up-bias
slot, row and slot 0 stay zero, a reused row holds nothing of the adapter before it (zeros where the
new one has no placement), storage grows by doubling and keeps what it holds, a full pool is refused
as overload and leaves nothing taken."""

import pytest
import torch

from prefixserve.engine.bottleneck_pool import INITIAL_ROWS, INITIAL_SLOTS, BottleneckPool, bytes_per_row
from prefixserve.errors import EngineOverloadedError
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_llama_config

CPU = torch.device("cpu")


@pytest.fixture
def arch():
    return LlamaArch.from_hf_config(tiny_llama_config())


def weights(arch, size, placements=("attention", "mlp"), seed=0):
    gen, h = torch.Generator().manual_seed(seed), arch.hidden_size
    return {(layer, p): (torch.randn(size, h, generator=gen), torch.randn(size, generator=gen),
                         torch.randn(h, size, generator=gen), torch.randn(h, generator=gen))
            for layer in range(arch.num_layers) for p in placements}


def test_an_adapter_takes_its_size_in_rows_and_one_slot(arch):
    pool = BottleneckPool(arch, max_rows=8, dtype=torch.float32, device=CPU)
    first = pool.load(weights(arch, 3), "gelu", 3)
    w = weights(arch, 2, seed=1)
    second = pool.load(w, "relu", 2)
    assert first.rows == (1, 2, 3) and second.rows == (4, 5) and first.slot != second.slot
    assert pool.num_free_rows == 3 and second.activation == "relu" and second.size == 2
    down, down_bias, up, up_bias = w[(1, "mlp")]
    mlp = pool.pools["mlp"]
    assert torch.equal(mlp["down"][1, list(second.rows)], down)
    assert torch.equal(mlp["down_bias"][1, list(second.rows)], down_bias)
    assert torch.equal(mlp["up"][1, list(second.rows)], up.T)  # row j: column j of the up matrix
    assert torch.equal(mlp["up_bias"][1, second.slot], up_bias)
    for tensors in pool.pools.values():
        assert not tensors["down"][:, 0].any() and not tensors["up"][:, 0].any()
        assert not tensors["down_bias"][:, 0].any() and not tensors["up_bias"][:, 0].any()


def test_a_full_pool_is_overload_and_takes_nothing(arch):
    pool = BottleneckPool(arch, max_rows=4, dtype=torch.float32, device=CPU)
    held = pool.load(weights(arch, 3), "gelu", 3)
    with pytest.raises(EngineOverloadedError, match="1 free rows of 4, the adapter needs 2"):
        pool.load(weights(arch, 2), "gelu", 2)
    assert pool.num_free_rows == 1
    pool.free(held)
    assert pool.load(weights(arch, 4), "gelu", 4).rows == (1, 2, 3, 4)


def test_a_reused_row_holds_nothing_of_the_adapter_before_it(arch):
    pool = BottleneckPool(arch, max_rows=8, dtype=torch.float32, device=CPU)
    old = pool.load(weights(arch, 4), "gelu", 4)
    pool.free(old)
    new = pool.load(weights(arch, 2, placements=("mlp",), seed=2), "gelu", 2)
    assert new.rows == old.rows[:2] and new.slot == old.slot
    attention = pool.pools["attention"]  # a placement the new adapter lacks: zeros, so it adds nothing
    assert not attention["down"][:, list(new.rows)].any() and not attention["up"][:, list(new.rows)].any()
    assert not attention["down_bias"][:, list(new.rows)].any() and not attention["up_bias"][:, new.slot].any()


def test_storage_grows_by_doubling_and_keeps_what_it_holds(arch):
    pool = BottleneckPool(arch, max_rows=4 * INITIAL_ROWS, dtype=torch.float32, device=CPU)
    first_weights = weights(arch, INITIAL_ROWS - 1)
    first = pool.load(first_weights, "gelu", INITIAL_ROWS - 1)
    held = [pool.load(weights(arch, 1, seed=i), "gelu", 1) for i in range(INITIAL_SLOTS + 1)]
    assert pool.capacity == 2 * INITIAL_ROWS and pool.slot_capacity == 2 * INITIAL_SLOTS
    assert pool.pools["mlp"]["down"].shape[1] == 1 + 2 * INITIAL_ROWS
    assert pool.pools["mlp"]["up_bias"].shape[1] == 1 + 2 * INITIAL_SLOTS
    assert torch.equal(pool.pools["attention"]["up"][0, list(first.rows)], first_weights[(0, "attention")][2].T)
    assert torch.equal(pool.pools["mlp"]["up_bias"][1, first.slot], first_weights[(1, "mlp")][3])
    assert len({a.slot for a in held} | {first.slot}) == len(held) + 1
    assert pool.bytes_allocated == sum(t.nbytes for p in pool.pools.values() for t in p.values())


def test_bytes_per_row_counts_both_placements_of_every_layer(arch):
    assert bytes_per_row(arch, torch.float16) == arch.num_layers * 2 * (2 * arch.hidden_size + 1) * 2
