"""Mixed-prefix paged decode attention: one query per sequence, Triton on CUDA.

Each sequence attends in one online softmax to its task's prefix pages (all visible) and then to
its own pages. One program owns one (sequence, KV head, KV split): the query heads that share the
KV head are packed as rows of one tile, padded to 16, so QK^T and PV are `tl.dot`s and the KV
bytes are read once per KV head. Long contexts with few sequences are split along the KV axis;
a second kernel merges the splits by their log-sum-exps.

Numerics: everything accumulates in fp32. QK^T multiplies q and k in their storage dtype with an
fp32 accumulator: products of two 16-bit floats are exact in fp32, so this equals upcasting them,
at half the registers. For PV, v is upcast and the fp32 probabilities enter a TF32 dot: fp16/bf16
values are exact in TF32 and p keeps 10 mantissa bits (more than bf16 would). An fp32 cache uses
IEEE dots throughout, so fp32 stays fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prefixserve.kernels.attention_checks import check_paged_inputs

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 64  # bounds the reduce kernel's tile


@triton.jit
def _attend_segment(acc, m_i, l_i, q, qpos, k_cache_ptr, v_cache_ptr, pages_ptr, kv_head, start, end,
                    qk_scale, stride_kp, stride_kt, stride_kh,
                    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over tokens [start, end) of one paged segment. Shared with prefill
    and cascade. acc: [BLOCK_M, D] fp32; m_i, l_i: [BLOCK_M] fp32 in log2 units; q: [BLOCK_M, D];
    qpos: [BLOCK_M] own position of each row, used only when CAUSAL."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for tok0 in range(start, end, BLOCK_N):
        toks = tok0 + offs_n  # [BLOCK_N] positions in this segment
        valid = toks < end
        # Pages are gathered per token, so BLOCK_N is independent of the page size.
        page = tl.load(pages_ptr + toks // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = page * stride_kp + (toks % PAGE_SIZE) * stride_kt + kv_head * stride_kh  # [BLOCK_N]
        kv_ptrs = kv_off[:, None] + offs_d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=valid[:, None], other=0.0)  # storage dtype, like q
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (toks[None, :] <= qpos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtracting it would make NaNs.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish_rows(acc, m_i, l_i, out_ptrs, lse_ptrs, row_mask, STORE_LSE: tl.constexpr):
    """Normalise and store. A row with no visible key gets out 0 and lse -inf (mergeable)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None])
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptrs, lse, mask=row_mask)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    seq_lens_ptr, page_table_ptr, prefix_lens_ptr, prefix_page_table_ptr, qk_scale,
    stride_qs, stride_qh, stride_os, stride_oh, stride_osplit, stride_ls, stride_lh, stride_lsplit,
    stride_pt, stride_ppt, stride_kp, stride_kt, stride_kh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    prefix_len = tl.load(prefix_lens_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Each sequence cuts its own prefix + own length into num_splits tiles-aligned ranges, so any
    # num_splits is correct; the launcher's choice only affects speed.
    total = prefix_len + seq_len
    per_split = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, total)

    rows = tl.arange(0, BLOCK_G)
    row_mask = rows < GROUP  # rows past the group are padding for tl.dot
    heads = kv_head * GROUP + rows
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)  # q: [BLOCK_G, D]
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    # Virtual positions [0, prefix_len) are the prefix, [prefix_len, total) the own pages.
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, rows, k_cache_ptr, v_cache_ptr, prefix_page_table_ptr + seq * stride_ppt, kv_head,
        tl.minimum(lo, prefix_len), tl.minimum(hi, prefix_len), qk_scale, stride_kp, stride_kt, stride_kh,
        PAGE_SIZE, HEAD_DIM, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, rows, k_cache_ptr, v_cache_ptr, page_table_ptr + seq * stride_pt, kv_head,
        tl.maximum(lo - prefix_len, 0), tl.maximum(hi - prefix_len, 0), qk_scale, stride_kp, stride_kt, stride_kh,
        PAGE_SIZE, HEAD_DIM, BLOCK_N, False, PRECISION)
    out_ptrs = out_ptr + seq * stride_os + split * stride_osplit + heads[:, None] * stride_oh + offs_d[None, :]
    lse_ptrs = lse_ptr + seq * stride_ls + split * stride_lsplit + heads * stride_lh
    _finish_rows(acc, m_i, l_i, out_ptrs, lse_ptrs, row_mask, STORE_LSE)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    stride_ps, stride_ph, stride_psplit, stride_ls, stride_lh, stride_lsplit, stride_os, stride_oh,
    stride_fs, stride_fh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Second stage: merge one (sequence, head)'s split partials by their log-sum-exps."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + seq * stride_ls + head * stride_lh + splits * stride_lsplit,
                  mask=splits < num_splits, other=float("-inf"))  # [BLOCK_S]
    part = tl.load(part_ptr + seq * stride_ps + head * stride_ph + splits[:, None] * stride_psplit
                   + offs_d[None, :], mask=(splits < num_splits)[:, None], other=0.0)  # [BLOCK_S, D]
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # empty splits have lse -inf and weigh 0
    w_sum = tl.sum(w, 0)
    w_safe = tl.where(w_sum == 0.0, 1.0, w_sum)
    out = tl.sum(part * w[:, None], 0) / w_safe  # [D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        tl.store(lse_ptr + seq * stride_fs + head * stride_fh,
                 tl.where(w_sum == 0.0, float("-inf"), m_safe + tl.log(w_safe)))


def dot_precision(dtype: torch.dtype) -> str:
    """TF32 is lossless for 16-bit operands; fp32 caches need IEEE to stay fp32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, never splits shorter than MIN_TOKENS_PER_SPLIT."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(target, max(num_seqs * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_kv_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: the one query of each sequence
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [num_seqs]: own KV length including the query token
    page_table: torch.Tensor,  # [num_seqs, max_pages]
    prefix_lens: torch.Tensor,  # [num_seqs]: 0 = no prefix
    prefix_page_table: torch.Tensor,  # [num_seqs, max_prefix_pages]
    scale: float,
    *,
    max_kv_len: int | None = None,  # host-side bound on prefix_len + seq_len; sizes the split count
    num_splits: int | None = None,  # force a split count (tests); None = heuristic
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns out [num_seqs, num_heads, head_dim] (and lse [num_seqs, num_heads] fp32, natural log)."""
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_paged_inputs(q, k_cache, v_cache, seq_lens, page_table, prefix_lens, prefix_page_table, num_seqs)
    if q.shape[0] != num_seqs:
        raise ValueError(f"expected one query per sequence ({num_seqs}), found q {tuple(q.shape)}")
    num_heads, head_dim = q.shape[1:]
    page_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    if num_splits is None:
        if max_kv_len is None:  # costs a device sync; the engine passes its host-side maxima
            max_kv_len = int((seq_lens + prefix_lens).max()) if num_seqs else 0
        num_splits = _num_splits(num_seqs, num_kv_heads, max_kv_len, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"expected 1 <= num_splits <= {MAX_SPLITS}, found {num_splits}")
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32, device=q.device)
    if num_seqs == 0:
        return (out, lse) if return_lse else out
    if num_splits == 1:  # write the final result directly
        part, part_lse = out[:, :, None], lse[:, :, None]
    else:
        part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    # Tile sizes from ptxas register counts for sm_90 (no spills, >= 2 CTAs per SM); not yet timed.
    block_n = 32 if head_dim <= 64 else 16
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part, part_lse, seq_lens, page_table, prefix_lens, prefix_page_table,
        scale * math.log2(math.e), q.stride(0), q.stride(1), part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), page_table.stride(0),
        prefix_page_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), STORE_LSE=return_lse or num_splits > 1,
        num_warps=8)
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part, part_lse, out, lse, num_splits, part.stride(0), part.stride(1), part.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1), HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            STORE_LSE=return_lse,
            num_warps=4)
    return (out, lse) if return_lse else out
