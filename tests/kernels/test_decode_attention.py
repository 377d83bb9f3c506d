"""Triton decode attention against its torch reference, and the reference against dense attention."""

import pytest
import torch
from attention_cases import assert_close, make_batch, naive_attention

from prefixserve.kernels.attention_reference import decode_attention_reference
from prefixserve.kernels.decode_attention import decode_attention

bf16_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="bf16 needs a CUDA GPU; the Triton interpreter rounds bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]
GQA = [(4, 4), (6, 2), (8, 1)]  # (num_heads, num_kv_heads): ratios 1, 3, 8
CASES = {  # (task prefix lens, [(task, seq_len, query_len)])
    "no_prefix_one_token": ([0], [(0, 1, 1)]),
    "prefix_of_one": ([1], [(0, 7, 1)]),
    "odd_prefix_shared_by_several": ([21, 0], [(0, 17, 1), (0, 33, 1), (1, 5, 1), (0, 1, 1)]),
    "one_task_per_sequence": ([37, 3, 16], [(0, 40, 1), (1, 2, 1), (2, 16, 1)]),
}
SCALE = 0.37


def _decode_args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.page_table, batch.prefix_lens,
            batch.prefix_page_table, SCALE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(case, heads, dtype):
    batch = make_batch(*CASES[case], num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, dtype=dtype)
    ref, ref_lse = decode_attention_reference(*_decode_args(batch), return_lse=True)
    for num_splits in (1, 3):  # 3 splits leave some splits empty for short sequences
        out, lse = decode_attention(*_decode_args(batch), num_splits=num_splits, return_lse=True)
        assert out.dtype == dtype
        assert_close(out, ref, dtype)
        assert_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (128, 5)])
def test_decode_head_dims_and_page_sizes(head_dim, page_size):
    batch = make_batch(*CASES["odd_prefix_shared_by_several"], num_heads=4, num_kv_heads=2, head_dim=head_dim,
                       page_size=page_size, dtype=torch.float16, seed=1)
    out = decode_attention(*_decode_args(batch), num_splits=2)
    assert_close(out, decode_attention_reference(*_decode_args(batch)), torch.float16)


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASES)
def test_decode_reference_matches_dense_attention(case, heads):
    batch = make_batch(*CASES[case], num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, seed=2)
    out, lse = decode_attention_reference(*_decode_args(batch), return_lse=True)
    expected_out, expected_lse = naive_attention(batch, SCALE)
    assert_close(out, expected_out, torch.float32)
    assert_close(lse, expected_lse, torch.float32)


def test_decode_rejects_bad_shapes_with_expected_and_found():
    batch = make_batch(*CASES["prefix_of_one"], num_heads=4, num_kv_heads=2, head_dim=16)
    args = list(_decode_args(batch))
    args[0] = args[0][..., :8].contiguous()  # head_dim 8 vs cache 16
    with pytest.raises(ValueError, match="expected head_dim 8.*found cache head_dim 16"):
        decode_attention(*args)
    args = list(_decode_args(batch))
    args[1] = args[1].half()
    with pytest.raises(ValueError, match="expected q, k_cache, v_cache of one dtype"):
        decode_attention(*args)
    args = list(_decode_args(batch))
    args[3] = args[3].float()
    with pytest.raises(ValueError, match="expected seq_lens int32/int64.*found torch.float32"):
        decode_attention(*args)
    with pytest.raises(ValueError, match="expected 1 <= num_splits"):
        decode_attention(*_decode_args(batch), num_splits=0)
