"""Triton prefix-aware prefill against its torch reference, the reference against dense attention,
and paged_attention's dispatch."""

import subprocess
import sys

import pytest
import torch
from attention_cases import assert_close, make_batch, naive_attention

from prefixserve.kernels.attention_reference import prefill_attention_reference
from prefixserve.kernels.paged_attention import PagedAttentionMetadata, paged_attention, paged_attention_reference
from prefixserve.kernels.prefill_attention import prefill_attention

bf16_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="bf16 needs a CUDA GPU; the Triton interpreter rounds bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]
GQA = [(4, 4), (6, 2), (8, 1)]
CASES = {  # (task prefix lens, [(task, seq_len, query_len)])
    "one_token_each": ([0, 5], [(0, 1, 1), (1, 9, 1)]),
    "chunk_without_context": ([0], [(0, 13, 13)]),
    "chunks_after_context_odd_prefix": ([19, 1], [(0, 40, 7), (0, 18, 18), (1, 3, 2)]),
    "decode_and_prefill_mixed": ([33, 0, 16], [(0, 50, 1), (1, 21, 21), (0, 17, 1), (2, 35, 16), (1, 2, 1)]),
    "chunk_spanning_query_blocks": ([3], [(0, 5, 1), (0, 80, 70), (0, 9, 2)]),  # 70 > BLOCK_Q for every group
}
SCALE = 0.29


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASES)
def test_prefill_matches_reference(case, heads, dtype):
    batch = make_batch(*CASES[case], num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, dtype=dtype)
    ref, ref_lse = prefill_attention_reference(*batch.paged_args(), SCALE, return_lse=True)
    out, lse = prefill_attention(*batch.paged_args(), SCALE, return_lse=True)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (128, 6)])
def test_prefill_head_dims_and_page_sizes(head_dim, page_size):
    batch = make_batch(*CASES["chunks_after_context_odd_prefix"], num_heads=6, num_kv_heads=2, head_dim=head_dim,
                       page_size=page_size, dtype=torch.float16, seed=3)
    out = prefill_attention(*batch.paged_args(), SCALE, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, prefill_attention_reference(*batch.paged_args(), SCALE, out_dtype=torch.float32),
                 torch.float16)


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASES)
def test_prefill_reference_matches_dense_attention(case, heads):
    batch = make_batch(*CASES[case], num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, seed=4)
    out, lse = prefill_attention_reference(*batch.paged_args(), SCALE, return_lse=True)
    expected_out, expected_lse = naive_attention(batch, SCALE)
    assert_close(out, expected_out, torch.float32)
    assert_close(lse, expected_lse, torch.float32)
    assert_close(paged_attention_reference(*batch.paged_args(), SCALE), expected_out, torch.float32)


def _meta(batch) -> PagedAttentionMetadata:
    query_lens = batch.cu_seqlens_q[1:] - batch.cu_seqlens_q[:-1]
    return PagedAttentionMetadata(
        slot_mapping=torch.zeros(batch.q.shape[0], dtype=torch.int64), cu_seqlens_q=batch.cu_seqlens_q,
        seq_lens=batch.seq_lens, page_table=batch.page_table, prefix_lens=batch.prefix_lens,
        prefix_page_table=batch.prefix_page_table, max_query_len=int(query_lens.max()),
        max_seq_len=int(batch.seq_lens.max()), max_prefix_len=int(batch.prefix_lens.max()))


@pytest.mark.parametrize("case", ["one_token_each", "decode_and_prefill_mixed"])
def test_paged_attention_dispatch_matches_dense_attention(case):
    batch = make_batch(*CASES[case], num_heads=6, num_kv_heads=2, head_dim=16, seed=5)
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, _meta(batch), SCALE)
    assert_close(out, naive_attention(batch, SCALE)[0], torch.float32)


def test_prefill_rejects_bad_cu_seqlens():
    batch = make_batch(*CASES["one_token_each"], num_heads=4, num_kv_heads=2, head_dim=16)
    args = list(batch.paged_args())
    args[3] = args[3][:-1]
    with pytest.raises(ValueError, match=r"expected cu_seqlens_q int32/int64 of shape \(3,\), found .*\(2,\)"):
        prefill_attention(*args, SCALE)


def test_cpu_paths_import_and_run_without_triton():
    """paged_attention and add_lora must work where triton is not installed (CPU-only wheels)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from prefixserve.kernels.paged_attention import paged_attention\n"
        "from prefixserve.kernels.lora import add_lora\n"
        "from prefixserve.kernels.lora_meta import lora_batch_metadata\n"
        "x, y = torch.randn(3, 8), torch.zeros(3, 4)\n"
        "a, b = torch.randn(4, 8), torch.randn(4, 4)\n"
        "a[0] = b[0] = 0  # the zero row\n"
        "add_lora(x, y, a, b, lora_batch_metadata([1, -1, 0], [[1, 2], [3]], [1.0, 2.0], torch.device('cpu')))\n"
        "assert y[1].abs().sum() == 0 and y[0].abs().sum() > 0 and y[2].abs().sum() > 0\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
