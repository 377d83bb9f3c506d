"""Prefix-aware varlen prefill/extend attention over paged KV, Triton on CUDA.

A chunk of new query tokens per sequence attends to all of its task's prefix, to its earlier own
pages, and causally to the chunk itself, in one online softmax. Decode rows (chunk of one) may sit
in the same batch, so this kernel serves any mix of decode, chunked prefill and prefix-cache hits.

One program owns BLOCK_Q consecutive query tokens of one sequence and one KV head; its tile rows
are (token, query head of that KV head) pairs, BLOCK_M = BLOCK_Q * group rows, so each KV tile is
read once for the whole group. The launch grid is flat over query blocks (no host-side maximum
needed) and each program finds its sequence by binary search over cu_seqlens_q.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prefixserve.kernels.attention_checks import check_paged_inputs
from prefixserve.kernels.decode_attention import _attend_segment, _finish_rows, dot_precision


@triton.jit
def _find_seq(cu_seqlens_q_ptr, block, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence s owns flat query blocks from cu_seqlens_q[s] // BLOCK_Q + s on: the +s gives every
    sequence room for its partial last block. Returns the last s whose first block <= block."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_block <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr,
    seq_lens_ptr, page_table_ptr, prefix_lens_ptr, prefix_page_table_ptr, qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_pt, stride_ppt, stride_kp, stride_kt, stride_kh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, block, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_block = block - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = tl.load(prefix_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP  # [BLOCK_M] query index within the sequence
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (tok < query_len)
    qpos = seq_len - query_len + tok  # own position of each row's token
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)  # q: [BLOCK_M, D], storage dtype
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, qpos, k_cache_ptr, v_cache_ptr, prefix_page_table_ptr + seq * stride_ppt, kv_head,
        0, prefix_len, qk_scale, stride_kp, stride_kt, stride_kh, PAGE_SIZE, HEAD_DIM, BLOCK_N, False, PRECISION)
    # Own keys past this block's last query are invisible to every row: stop the loop there.
    own_end = tl.minimum(seq_len, seq_len - query_len + (q_block + 1) * BLOCK_Q)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, qpos, k_cache_ptr, v_cache_ptr, page_table_ptr + seq * stride_pt, kv_head,
        0, own_end, qk_scale, stride_kp, stride_kt, stride_kh, PAGE_SIZE, HEAD_DIM, BLOCK_N, True, PRECISION)
    out_ptrs = out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    lse_ptrs = lse_ptr + (q_start + tok) * stride_lt + heads * stride_lh
    _finish_rows(acc, m_i, l_i, out_ptrs, lse_ptrs, row_mask, STORE_LSE)


def wide_fp32(dtype: torch.dtype, head_dim: int) -> bool:
    """An fp32 cache at head_dim 64 or more: IEEE dots without tensor cores and twice the tile bytes of
    16-bit storage, so tiles sized for fp16/bf16 spill (ptxas counts, tests/kernels/test_gpu_compile.py;
    head_dim 64 spilled with the Triton that torch 2.13 pins, 3.7.1, and not with 3.9)."""
    return dtype == torch.float32 and head_dim >= 64


def tile_rows(group: int, dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows per tile and query tokens per tile for a GQA group size. 64 rows
    with 8 warps fit head_dim 128 in sm_90 registers without spills; `wide_fp32` caches need 32
    (with 16 keys a step in prefill). Not yet timed."""
    rows = 32 if wide_fp32(dtype, head_dim) else 64
    block_m = max(rows, triton.next_power_of_2(group))
    return block_m, block_m // group


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1]: query token offsets
    seq_lens: torch.Tensor,  # [num_seqs]: own KV length after this step; the last query_len are queries
    page_table: torch.Tensor,  # [num_seqs, max_pages]
    prefix_lens: torch.Tensor,  # [num_seqs]: 0 = no prefix
    prefix_page_table: torch.Tensor,  # [num_seqs, max_prefix_pages]
    scale: float,
    *,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns out [num_tokens, num_heads, head_dim] (and lse [num_tokens, num_heads] fp32, natural log)."""
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_paged_inputs(q, k_cache, v_cache, seq_lens, page_table, prefix_lens, prefix_page_table, num_seqs)
    if cu_seqlens_q.shape != (num_seqs + 1,) or cu_seqlens_q.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected cu_seqlens_q int32/int64 of shape ({num_seqs + 1},), "
                         f"found {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return (out, lse) if return_lse else out
    block_m, block_q = tile_rows(group, q.dtype, head_dim)
    block_n = 16 if wide_fp32(q.dtype, head_dim) else 32
    num_blocks = num_tokens // block_q + num_seqs  # upper bound, see _find_seq
    _prefill_attention_kernel[(num_blocks, num_kv_heads)](
        q, k_cache, v_cache, out, lse, cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table,
        scale * math.log2(math.e), num_seqs, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1), page_table.stride(0), prefix_page_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), STORE_LSE=return_lse, num_warps=8)
    return (out, lse) if return_lse else out
