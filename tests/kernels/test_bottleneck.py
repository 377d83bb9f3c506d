"""Batched bottleneck adapters against a per-token computation from each adapter's own matrices, on
batches that exercise every branch: decode rows grouped, sizes in different buckets, activations
grouped apart, padded groups of unequal segments, long segments run alone, tokens without adapters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefixserve.kernels.bottleneck import ACTIVATION_FNS, add_bottleneck, plan_bottleneck
from prefixserve.kernels.lora_grouped import MAX_GROUPED_TOKENS
from prefixserve.kernels.lora_meta import ZERO_ROW, lora_batch_metadata

HIDDEN = 48


def make_pool(adapters, dtype, seed=0):
    """adapters: [(size, activation)] scattered over a pool's rows (interleaved); returns the pool
    tensors, each adapter's rows and slot, and its own (down [r, h], down_bias [r], up [h, r], up_bias [h])."""
    gen = torch.Generator().manual_seed(seed)
    num_rows = 1 + sum(size for size, _ in adapters) + 5
    free = (torch.randperm(num_rows - 1, generator=gen) + 1).tolist()
    down, down_bias, up = torch.zeros(num_rows, HIDDEN), torch.zeros(num_rows), torch.zeros(num_rows, HIDDEN)
    up_bias = torch.zeros(len(adapters) + 3, HIDDEN)
    rows, slots, own = [], [], []
    for i, (size, _) in enumerate(adapters):
        taken = [free.pop() for _ in range(size)]
        d, bd = torch.randn(size, HIDDEN, generator=gen) / 4, torch.randn(size, generator=gen)
        u, bu = torch.randn(HIDDEN, size, generator=gen) / 4, torch.randn(HIDDEN, generator=gen) / 4
        down[taken], down_bias[taken], up[taken], up_bias[i + 2] = d, bd, u.T, bu
        rows.append(taken)
        slots.append(i + 2)
        own.append((d, bd, u, bu))
    assert not down[ZERO_ROW].any() and not up[ZERO_ROW].any() and not down_bias[ZERO_ROW].any()
    return [t.to(dtype) for t in (down, down_bias, up, up_bias)], rows, slots, own


def expected(y, token_segment, adapters, own):
    out = y.clone().float()
    for t, s in enumerate(token_segment):
        if s >= 0:
            d, bd, u, bu = own[s]
            h = ACTIVATION_FNS[adapters[s][1]](F.linear(y[t].float(), d.float(), bd.float()))
            out[t] += F.linear(h, u.float(), bu.float())
    return out.to(y.dtype)


CASES = {
    "decode_rows": ([(4, "gelu"), (2, "gelu"), (9, "gelu")], [0, 1, 2, -1, 0, 2]),
    "activations_apart": ([(3, "relu"), (3, "tanh"), (3, "silu"), (3, "gelu")], [3, 2, 1, 0, 0, -1, 2]),
    "unequal_segments": ([(5, "relu"), (16, "relu")], [0] * 7 + [1] * 2 + [-1] * 3),
    "long_prefill_alone": ([(6, "gelu"), (2, "silu")], [0] * (MAX_GROUPED_TOKENS + 5) + [1, 1, -1]),
    "none_on_some_tokens": ([(1, "tanh")], [-1, -1, 0, -1]),
}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_each_adapter_applied_per_token(case, dtype, tol):
    adapters, token_segment = case
    pools, rows, slots, own = make_pool(adapters, dtype)
    y = torch.randn(len(token_segment), HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype)
    reference = expected(y, token_segment, adapters, own)
    meta = lora_batch_metadata(np.array(token_segment), rows, [1.0] * len(rows), torch.device("cpu"))
    plan = plan_bottleneck(meta, [activation for _, activation in adapters], slots)
    out = y.clone()
    add_bottleneck(out, *pools, plan)
    torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    plain = [t for t, s in enumerate(token_segment) if s < 0]
    assert torch.equal(out[plain], y[plain])  # tokens without an adapter are left bitwise alone
