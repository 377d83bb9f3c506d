"""The CPU grouped LoRA against a per-token computation from each adapter's PEFT-shaped A and B,
on batches that exercise every branch: grouped decode rows, rank buckets side by side, padded
groups of unequal segments, long segments run alone, empty segments and tokens without LoRA."""

import numpy as np
import pytest
import torch

from prefixserve.kernels.lora_grouped import MAX_GROUPED_TOKENS, add_lora_grouped, plan_groups
from prefixserve.kernels.lora_meta import ZERO_ROW, lora_batch_metadata

IN_FEATURES, OUT_FEATURES = 72, 40


def make_pool(ranks, dtype, seed=0):
    """Adapters scattered over a pool's rows (interleaved, not contiguous); returns the pool, each
    adapter's rows, and its PEFT-shaped (A [r, in], B [out, r], scaling)."""
    gen = torch.Generator().manual_seed(seed)
    num_rows = 1 + sum(ranks) + 7
    free = (torch.randperm(num_rows - 1, generator=gen) + 1).tolist()
    pool_a = torch.zeros(num_rows, IN_FEATURES)
    pool_b = torch.zeros(num_rows, OUT_FEATURES)
    rows, adapters = [], []
    for r in ranks:
        own = [free.pop() for _ in range(r)]
        a = torch.randn(r, IN_FEATURES, generator=gen) / 4
        b = torch.randn(OUT_FEATURES, r, generator=gen) / 4
        pool_a[own], pool_b[own] = a, b.T
        rows.append(own)
        adapters.append((a, b, float(torch.rand(1, generator=gen)) + 0.5))
    assert not pool_a[ZERO_ROW].any()
    return pool_a.to(dtype), pool_b.to(dtype), rows, adapters


def expected(x, y, token_segment, adapters):
    out = y.clone().float()
    for t, s in enumerate(token_segment):
        if s >= 0:
            a, b, scale = adapters[s]
            out[t] += scale * (x[t].float() @ a.T @ b.T)
    return out


CASES = {
    "decode_rows_distinct_adapters": ([8, 8, 3, 16], [0, 1, 2, 3, -1, 2]),
    "ranks_1_to_64_side_by_side": ([1, 8, 9, 33, 64], [4, 0, 3, 1, 2, 4, -1]),
    "unequal_short_segments_padded": ([4, 4], [0] * 5 + [1] + [-1] * 2 + [0] * 3),
    "long_segment_alone_beside_decodes": ([8, 16, 2], [0] * (MAX_GROUPED_TOKENS + 9) + [1, -1, 2, 1]),
    "segment_without_tokens": ([8, 8, 8], [0, 2, 0]),
    "no_lora_tokens": ([8], [-1, -1, -1]),
    "decode_rows_spanning_the_batch_out_of_order": ([8, 4, 8], [2, 0, 1, 2, 1]),
    "chunks_of_one_adapter_split_by_others": ([8, 8], [0] * (MAX_GROUPED_TOKENS + 2) + [1] + [0] * 3),
    "rows_in_more_runs_than_slice_adds": ([8, 4], [0, -1] * 6 + [1, -1] * 3 + [0] * (MAX_GROUPED_TOKENS + 1) + [-1, 0]),
}


@pytest.mark.parametrize("fused", [False, True], ids=["own_output", "column_slice_of_fused_output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_grouped_matches_per_token(case, dtype, fused):
    ranks, token_segment = CASES[case]
    pool_a, pool_b, rows, adapters = make_pool(ranks, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(token_segment), IN_FEATURES, generator=gen).to(dtype)
    y = torch.randn(len(token_segment), OUT_FEATURES, generator=gen).to(dtype)
    meta = lora_batch_metadata(np.array(token_segment), rows, [s for *_, s in adapters], torch.device("cpu"))
    # q/k/v and gate/up are column slices of one fused output: rows strided, the other columns untouched
    fused_out = torch.randn(len(token_segment), OUT_FEATURES + 13, generator=gen).to(dtype)
    out = fused_out[:, 5:5 + OUT_FEATURES] if fused else y.clone()
    out.copy_(y)
    before = fused_out.clone()
    add_lora_grouped(x, out, pool_a, pool_b, meta)
    if fused:
        assert torch.equal(fused_out[:, :5], before[:, :5]) and torch.equal(fused_out[:, 5 + OUT_FEATURES:],
                                                                            before[:, 5 + OUT_FEATURES:])
    # the reference sees the same (rounded) weights the pool holds
    rounded = [(a.to(dtype).float(), b.to(dtype).float(), s) for a, b, s in adapters]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected(x, y, token_segment, rounded), atol=tol, rtol=tol)
    plain = torch.tensor(token_segment) < 0
    assert torch.equal(out[plain], y[plain])  # rows without LoRA untouched, bit for bit


def test_plan_groups_by_rank_bucket_and_length():
    ranks = [8, 5, 16, 64, 8]
    token_segment = [0, 1, 2, 3, 4] + [4] * (MAX_GROUPED_TOKENS + 1)
    _, _, rows, _ = make_pool(ranks, torch.float32)
    meta = lora_batch_metadata(np.array(token_segment), rows, [1.0] * len(ranks), torch.device("cpu"))
    plan = plan_groups(meta)
    assert sorted(g.shape for g in plan.groups) == [(1, 1, 16), (1, 1, 64), (2, 1, 8)]  # ranks 8 and 5 share
    assert [len(s.tokens) for s in plan.singles] == [MAX_GROUPED_TOKENS + 2]


def test_one_op_count_whatever_the_number_of_adapters():
    """The point of grouping: 64 distinct rank-8 adapters in a decode step are one group."""
    _, _, rows, _ = make_pool([8] * 64, torch.float32)
    meta = lora_batch_metadata(np.arange(64), rows, [1.0] * 64, torch.device("cpu"))
    plan = plan_groups(meta)
    assert [g.shape for g in plan.groups] == [(64, 1, 8)] and not plan.singles
