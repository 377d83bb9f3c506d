"""Cascade attention: a task's shared prefix attended once for all of its queries, then merged.

The per-sequence kernels read a task's prefix pages once per sequence, and in decode their tile
holds only one sequence's query heads (a GQA group of 2 fills 2 of 16 rows). Here sequences are
sorted by task, so a task's query tokens are contiguous: one program takes BLOCK_Q of them across
sequences and streams the prefix once, with every row of the tile in use. The own pages are then
attended per sequence with no prefix, and the two partial states are merged by their
log-sum-exps. Both partials are kept in fp32, so the merge adds no rounding.

`cascade_plan.should_use_cascade` says when the saved prefix traffic pays for the extra work, and
`cascade_plan.plan_cascade` sorts a step's batch by task for `cascade_paged_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prefixserve.kernels.attention_checks import check_paged_inputs
from prefixserve.kernels.attention_reference import prefill_attention_reference
from prefixserve.kernels.cascade_plan import CascadePlan
from prefixserve.kernels.decode_attention import (
    _attend_segment,
    _finish_rows,
    decode_attention,
    dot_precision,
)
from prefixserve.kernels.merge_attn_states import merge_attn_states
from prefixserve.kernels.prefill_attention import prefill_attention, tile_rows


@triton.jit
def _cascade_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqs_per_task_ptr,
    task_prefix_lens_ptr, task_prefix_page_table_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, stride_ppt, stride_kp, stride_kt, stride_kh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefix stage: one program = BLOCK_Q query tokens of one task x one KV head, whole prefix."""
    task = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok_start = tl.load(cu_seqlens_q_ptr + tl.load(cu_seqs_per_task_ptr + task))
    num_task_tokens = tl.load(cu_seqlens_q_ptr + tl.load(cu_seqs_per_task_ptr + task + 1)) - tok_start
    if q_block * BLOCK_Q >= num_task_tokens:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = tok_start + q_block * BLOCK_Q + rows // GROUP  # [BLOCK_M] flat token index, across sequences
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (tok < tok_start + num_task_tokens)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)  # q: [BLOCK_M, D], storage dtype
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, rows, k_cache_ptr, v_cache_ptr, task_prefix_page_table_ptr + task * stride_ppt, kv_head,
        0, tl.load(task_prefix_lens_ptr + task), qk_scale, stride_kp, stride_kt, stride_kh,
        PAGE_SIZE, HEAD_DIM, BLOCK_N, False, PRECISION)
    out_ptrs = out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    _finish_rows(acc, m_i, l_i, out_ptrs, lse_ptr + tok * stride_lt + heads * stride_lh, row_mask, True)


def cascade_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]; sequences sorted by task
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1]
    seq_lens: torch.Tensor,  # [num_seqs]: own KV length after this step
    page_table: torch.Tensor,  # [num_seqs, max_pages]: own pages
    cu_seqs_per_task: torch.Tensor,  # [num_tasks + 1]: task t owns sequences cu[t]:cu[t+1]; covers all
    task_prefix_lens: torch.Tensor,  # [num_tasks]: 0 = no prefix (plain backbone requests)
    task_prefix_page_table: torch.Tensor,  # [num_tasks, max_prefix_pages]
    scale: float,
    *,
    max_tokens_per_task: int | None = None,  # host-side; sizes the grid (None = one device sync)
    max_query_len: int | None = None,  # host-side; 1 picks the decode kernel for the own pages
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    num_seqs, num_tasks = seq_lens.shape[0], task_prefix_lens.shape[0]
    check_paged_inputs(q, k_cache, v_cache, seq_lens, page_table, seq_lens, page_table, num_seqs)
    check_paged_inputs(q, k_cache, v_cache, task_prefix_lens, task_prefix_page_table, task_prefix_lens,
                       task_prefix_page_table, num_tasks)
    int_dtypes = (torch.int32, torch.int64)
    if (cu_seqs_per_task.shape != (num_tasks + 1,) or cu_seqlens_q.shape != (num_seqs + 1,)
            or cu_seqs_per_task.dtype not in int_dtypes or cu_seqlens_q.dtype not in int_dtypes):
        raise ValueError(f"expected int cu_seqs_per_task ({num_tasks + 1},) and cu_seqlens_q ({num_seqs + 1},), found "
                         f"{cu_seqs_per_task.dtype} {tuple(cu_seqs_per_task.shape)}, {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    no_prefix = torch.zeros_like(seq_lens)
    if max_query_len == 1 and num_tokens == num_seqs:
        own, own_lse = decode_attention(q, k_cache, v_cache, seq_lens, page_table, no_prefix, page_table, scale,
                                        return_lse=True, out_dtype=torch.float32)
    else:
        own, own_lse = prefill_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, no_prefix,
                                         page_table, scale, return_lse=True, out_dtype=torch.float32)
    pre = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    pre_lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if max_tokens_per_task is None:
        per_task = cu_seqlens_q.long()[cu_seqs_per_task.long()]
        max_tokens_per_task = int((per_task[1:] - per_task[:-1]).max()) if num_tasks else 0
    block_m, block_q = tile_rows(group, q.dtype, head_dim)
    if num_tokens and num_tasks and max_tokens_per_task:
        _cascade_attention_kernel[(num_tasks, triton.cdiv(max_tokens_per_task, block_q), num_kv_heads)](
            q, k_cache, v_cache, pre, pre_lse, cu_seqlens_q, cu_seqs_per_task, task_prefix_lens,
            task_prefix_page_table, scale * math.log2(math.e), q.stride(0), q.stride(1), pre.stride(0),
            pre.stride(1), pre_lse.stride(0), pre_lse.stride(1), task_prefix_page_table.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
            BLOCK_N=32, PRECISION=dot_precision(q.dtype), num_warps=8)
    return merge_attn_states(pre, pre_lse, own, own_lse, out_dtype=q.dtype)


def cascade_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CascadePlan,
                            scale: float) -> torch.Tensor:
    """Cascade over a batch in its own order: queries gathered into the plan's task order, attended,
    and scattered back. q: [num_tokens, num_heads, head_dim] -> the same shape, batch order."""
    out = cascade_attention(
        q.index_select(0, plan.token_order), k_cache, v_cache, plan.cu_seqlens_q, plan.seq_lens, plan.page_table,
        plan.cu_seqs_per_task, plan.task_prefix_lens, plan.task_prefix_page_table, scale,
        max_tokens_per_task=plan.max_tokens_per_task, max_query_len=plan.max_query_len)
    return torch.empty_like(q).index_copy_(0, plan.token_order, out)


def cascade_attention_reference(
    q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, cu_seqs_per_task, task_prefix_lens,
    task_prefix_page_table, scale, *, max_tokens_per_task=None, max_query_len=None,
):
    """Cascade is only a schedule: the result is mixed-prefix attention with each task's prefix
    repeated per sequence."""
    seqs_per_task = (cu_seqs_per_task[1:] - cu_seqs_per_task[:-1]).long()
    seq_task = torch.repeat_interleave(torch.arange(len(seqs_per_task), device=q.device), seqs_per_task)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table,
                                       task_prefix_lens[seq_task], task_prefix_page_table[seq_task], scale)
