"""Batched LoRA shrink/expand over the row pool against the torch references, and the references
(and add_lora) against a plain per-token computation with each adapter's PEFT-shaped A and B.

Adapters own scattered, interleaved pool rows and every row nobody owns holds random values (row 0
excepted, the shared zero row), so a kernel that gathers a wrong row or reads past a rank is caught."""

import numpy as np
import pytest
import torch
from attention_cases import DEVICE, TOLERANCES

from prefixserve.kernels.lora import (
    add_lora,
    lora_expand,
    lora_expand_reference,
    lora_shrink,
    lora_shrink_reference,
)
from prefixserve.kernels.lora_meta import ZERO_ROW, lora_batch_metadata

bf16_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="bf16 needs a CUDA GPU; the Triton interpreter rounds bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]
IN_FEATURES, OUT_FEATURES = 72, 40  # not multiples of the kernel tiles

# Pool rows of each segment's adapter: ranks 3, 8, 1, 16, a rank-2 adapter with no tokens this step
# and a rank-0 one (no weights for this projection), owned out of order and interleaved.
SEGMENT_ROWS = [
    [5, 2, 9],
    [3, 7, 1, 4, 12, 20, 15, 17],
    [10],
    [6, 8, 11, 13, 14, 16, 18, 19, 21, 23, 25, 27, 29, 31, 22, 24],
    [26, 30],
    [],
]
POOL_ROWS = 34  # rows 28, 32 and 33 belong to nobody
TOKEN_SEGMENTS = {  # segment of each token, -1 = no LoRA; segment 4 never appears
    "decode": [3, 0, -1, 1, 2, 5, -1],
    "prefill_mixed": [1, 1, 0, -1, 3, 3, 3, 1, -1, 2, 5] + [3] * 20 + [0, -1, 1],  # segment 3 > 16 tokens
    "all_no_lora": [-1, -1, -1],
}


class Pool:
    """Row pools of one projection, and each segment's adapter as PEFT holds it."""

    def __init__(self, segment_rows: list[list[int]], pool_rows: int, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        lora_a = torch.randn(pool_rows, IN_FEATURES, generator=gen) / 4  # unowned rows stay random
        lora_b = torch.randn(pool_rows, OUT_FEATURES, generator=gen) / 4
        lora_a[ZERO_ROW] = lora_b[ZERO_ROW] = 0
        self.lora_a, self.lora_b = lora_a.to(dtype).to(DEVICE), lora_b.to(dtype).to(DEVICE)
        # PEFT's A [r, in] and B [out, r] of each segment's adapter
        self.peft = [(self.lora_a[rows].float(), self.lora_b[rows].float().T) for rows in segment_rows]
        self.scaling = (torch.rand(len(segment_rows), generator=gen) + 0.5).tolist()
        self.segment_rows = segment_rows

    def meta(self, token_segments: list[int]):
        return lora_batch_metadata(np.array(token_segments), self.segment_rows, self.scaling, torch.device(DEVICE))

    def per_token(self, x: torch.Tensor, y: torch.Tensor, token_segments: list[int]) -> torch.Tensor:
        """y + scale * x @ A^T @ B^T, one token at a time, in fp32."""
        expected = y.float().clone()
        for t, s in enumerate(token_segments):
            if s >= 0 and self.segment_rows[s]:
                a, b = self.peft[s]
                expected[t] += self.scaling[s] * (x[t].float() @ a.T @ b.T)
        return expected


def _tokens(num_tokens: int, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    y = torch.randn(num_tokens, OUT_FEATURES, generator=gen).to(dtype).to(DEVICE)
    return x, y


def _check_kernels(pool: Pool, token_segments: list[int], dtype) -> None:
    x, y = _tokens(len(token_segments), dtype)
    meta = pool.meta(token_segments)
    h_ref = lora_shrink_reference(x, pool.lora_a, meta)
    y_ref = y.clone()
    lora_expand_reference(h_ref, pool.lora_b, y_ref, meta)
    ranks = torch.tensor([len(pool.segment_rows[s]) if s >= 0 else 0 for s in token_segments], device=DEVICE)
    past_rank = torch.arange(meta.max_rank, device=DEVICE)[None, :] >= ranks[:, None]  # [T, max_rank]
    untouched = ranks == 0  # no LoRA, or a rank-0 segment
    tol = TOLERANCES[dtype]
    for split_k in (1, 3):  # 3 splits of in_features meet through atomic adds
        h = lora_shrink(x, pool.lora_a, meta, split_k=split_k)
        torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)
        assert not h[past_rank].any(), "expected h zero past each segment's rank and for tokens without LoRA"
        y_out = y.clone()
        lora_expand(h, pool.lora_b, y_out, meta)
        torch.testing.assert_close(y_out.float(), y_ref.float(), atol=tol, rtol=tol)
        assert torch.equal(y_out[untouched], y[untouched])  # bit for bit
        assert bool(untouched.all()) or not torch.equal(y_out[~untouched], y[~untouched])  # LoRA rows changed


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", TOKEN_SEGMENTS)
def test_kernels_match_references(case, dtype):
    _check_kernels(Pool(SEGMENT_ROWS, POOL_ROWS, dtype), TOKEN_SEGMENTS[case], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_kernels_match_references_at_rank_64(dtype):
    """BLOCK_R 64 and, past 16 tokens per segment, the narrower BLOCK_M the launcher picks for it."""
    perm = (torch.randperm(80, generator=torch.Generator().manual_seed(2)) + 1).tolist()
    segment_rows = [perm[:64], perm[64:67]]  # ranks 64 and 3, scattered over rows 1..80
    _check_kernels(Pool(segment_rows, 84, dtype), [0] * 12 + [1, -1] * 5 + [0] * 9, dtype)


@pytest.mark.parametrize("case", TOKEN_SEGMENTS)
def test_references_match_per_token_computation(case):
    pool = Pool(SEGMENT_ROWS, POOL_ROWS, torch.float32)
    x, y = _tokens(len(TOKEN_SEGMENTS[case]), torch.float32)
    meta = pool.meta(TOKEN_SEGMENTS[case])
    y_out = y.clone()
    lora_expand_reference(lora_shrink_reference(x, pool.lora_a, meta), pool.lora_b, y_out, meta)
    torch.testing.assert_close(y_out, pool.per_token(x, y, TOKEN_SEGMENTS[case]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TOKEN_SEGMENTS)
def test_add_lora_matches_per_token_computation(case):
    """The dispatching call: Triton on CUDA, the grouped torch path on CPU."""
    pool = Pool(SEGMENT_ROWS, POOL_ROWS, torch.float32)
    x, y = _tokens(len(TOKEN_SEGMENTS[case]), torch.float32)
    y_out = y.clone()
    add_lora(x, y_out, pool.lora_a, pool.lora_b, pool.meta(TOKEN_SEGMENTS[case]))
    torch.testing.assert_close(y_out, pool.per_token(x, y, TOKEN_SEGMENTS[case]), atol=1e-5, rtol=1e-5)
    no_lora = torch.tensor([s < 0 or not SEGMENT_ROWS[s] for s in TOKEN_SEGMENTS[case]], device=DEVICE)
    assert torch.equal(y_out[no_lora], y[no_lora])


def test_lora_rejects_mismatched_inputs_with_expected_and_found():
    pool = Pool([[1, 2, 3, 4]], 5, torch.float32)
    x, y = _tokens(2, torch.float32)
    meta = pool.meta([0, 0])
    with pytest.raises(ValueError, match="expected x and lora_a of one dtype.*found torch.float16 and torch.float32"):
        lora_shrink(x.half(), pool.lora_a, meta)
    with pytest.raises(ValueError, match=r"expected x \[num_tokens, 72\] and lora_a \[pool_rows, 72\].*"
                                         r"found x \(2, 71\)"):
        lora_shrink(x[:, :71], pool.lora_a, meta)
    with pytest.raises(ValueError, match=r"expected x \[num_tokens, features\].*found .* lora_a \(1, 5, 72\)"):
        lora_shrink(x, pool.lora_a[None], meta)  # the old stacked-slot layout
    with pytest.raises(ValueError, match=r"expected h fp32 \[2, 4\].*found torch.float32 \(2, 3\)"):
        lora_expand(torch.zeros(2, 3, device=DEVICE), pool.lora_b, y, meta)
    meta.segment_scaling = meta.segment_scaling.double()
    with pytest.raises(ValueError, match=r"expected meta.segment_scaling \[1\] of torch.float32.*found torch.float64"):
        lora_expand(torch.zeros(2, 4, device=DEVICE), pool.lora_b, y, meta)
