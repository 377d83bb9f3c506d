"""Batched multi-adapter LoRA over a row pool (S-LoRA/Punica style SGMV), Triton on CUDA.

  shrink: h[t, :r] = x[t] @ A[rows(s)]^T                 h: [num_tokens, max_rank] fp32
  expand: y[t] += scaling[s] * h[t, :r] @ B[rows(s)]      for token t of segment s, rank r

Each projection keeps one pool per layer: lora_a [pool_rows, in_features] and lora_b [pool_rows,
out_features], where row j of lora_b is column j of PEFT's B, so both kernels read whole rows. An
adapter of rank r owns r arbitrary pool rows; `lora_meta.lora_batch_metadata` lists them per
segment (`segment_rows`) once per step, and the kernels gather A and B rows by id: no padding to
a maximum rank, no stacked slots. A segment with rank 0 or no tokens is skipped, as are tokens in
no segment: their rows of y are left untouched and their rows of h stay zero.

`add_lora` is the one call per projection: these kernels on CUDA, `lora_grouped` elsewhere. The
`*_reference` functions are plain loops over segments, the ground truth for the tests.
triton is imported softly: CPU-only installs have none and never launch the kernels.
"""

from __future__ import annotations

import torch

from prefixserve.kernels.lora_grouped import add_lora_grouped
from prefixserve.kernels.lora_meta import LoRABatchMetadata

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # kernels below are never launched without triton; the references still run
    triton = tl = None

    def _jit(fn):
        return fn


@_jit
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, h_ptr, token_indices_ptr, num_tokens_per_segment_ptr, segment_start_offsets_ptr,
    segment_rows_ptr, segment_ranks_ptr, in_features, k_per_split, stride_xt, stride_ar, stride_rs, stride_ht,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """One program: BLOCK_M tokens of one segment x one slice of in_features (split-K)."""
    segment = tl.program_id(0)
    m_block = tl.program_id(1)
    k_split = tl.program_id(2)
    rank = tl.load(segment_ranks_ptr + segment)
    num_tokens = tl.load(num_tokens_per_segment_ptr + segment)
    if (rank == 0) | (m_block * BLOCK_M >= num_tokens):
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_tokens
    tokens = tl.load(token_indices_ptr + tl.load(segment_start_offsets_ptr + segment) + offs_m, mask=m_mask,
                     other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank  # the table is max_rank wide and BLOCK_R >= max_rank: masks both
    pool_rows = tl.load(segment_rows_ptr + segment * stride_rs + offs_r, mask=r_mask, other=0)  # [BLOCK_R]
    offs_k = tl.arange(0, BLOCK_K)
    a_base = lora_a_ptr + pool_rows.to(tl.int64)[:, None] * stride_ar  # [BLOCK_R, 1]: gathered A rows
    x_base = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
    k_start = k_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k
        k_mask = cols < k_end
        x = tl.load(x_base + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        a = tl.load(a_base + cols[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        acc += tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_R]
    h_ptrs = h_ptr + tokens[:, None] * stride_ht + offs_r[None, :]
    h_mask = m_mask[:, None] & r_mask[None, :]
    if ATOMIC:  # split-K partial sums meet in the fp32 h, which starts at zero
        tl.atomic_add(h_ptrs, acc, mask=h_mask)
    else:
        tl.store(h_ptrs, acc, mask=h_mask)


@_jit
def _lora_expand_kernel(
    h_ptr, lora_b_ptr, y_ptr, token_indices_ptr, num_tokens_per_segment_ptr, segment_start_offsets_ptr,
    segment_rows_ptr, segment_ranks_ptr, segment_scaling_ptr, out_features, stride_ht, stride_br, stride_rs,
    stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M tokens of one segment x BLOCK_N output features. A token belongs to
    one segment, so read-add-write of y needs no atomics."""
    segment = tl.program_id(0)
    m_block = tl.program_id(1)
    n_block = tl.program_id(2)
    rank = tl.load(segment_ranks_ptr + segment)
    num_tokens = tl.load(num_tokens_per_segment_ptr + segment)
    if (rank == 0) | (m_block * BLOCK_M >= num_tokens):
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_tokens
    tokens = tl.load(token_indices_ptr + tl.load(segment_start_offsets_ptr + segment) + offs_m, mask=m_mask,
                     other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    pool_rows = tl.load(segment_rows_ptr + segment * stride_rs + offs_r, mask=r_mask, other=0)  # [BLOCK_R]
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    h = tl.load(h_ptr + tokens[:, None] * stride_ht + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    b = tl.load(lora_b_ptr + pool_rows.to(tl.int64)[:, None] * stride_br + offs_n[None, :],
                mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N] gathered rows
    delta = tl.dot(h, b, input_precision=PRECISION) * tl.load(segment_scaling_ptr + segment)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_meta(meta: LoRABatchMetadata, device: torch.device) -> None:
    """Shapes, dtypes and device of the metadata; row ids are trusted (checking them would sync)."""
    num_segments = meta.num_segments
    expected = {
        "token_indices": (None, _INDEX_DTYPES),
        "num_tokens_per_segment": ((num_segments,), _INDEX_DTYPES),
        "segment_start_offsets": ((num_segments,), _INDEX_DTYPES),
        "segment_rows": ((num_segments, meta.max_rank), _INDEX_DTYPES),
        "segment_ranks": ((num_segments,), _INDEX_DTYPES),
        "segment_scaling": ((num_segments,), (torch.float32,)),
    }
    for name, (shape, dtypes) in expected.items():
        t = getattr(meta, name)
        shape_ok = t.dim() == 1 if shape is None else tuple(t.shape) == shape
        if not shape_ok or t.dtype not in dtypes or t.device != device:
            want = "[num_lora_tokens]" if shape is None else list(shape)
            raise ValueError(f"expected meta.{name} {want} of {'/'.join(str(d) for d in dtypes)} on {device}, "
                             f"found {t.dtype} {tuple(t.shape)} on {t.device}")


def _check_weights(act: torch.Tensor, pool: torch.Tensor, act_name: str, pool_name: str) -> None:
    """act [num_tokens, features] against its row pool [pool_rows, features]."""
    features = pool.shape[-1] if pool.dim() == 2 else "features"
    if act.dim() != 2 or pool.dim() != 2 or act.shape[1] != pool.shape[1]:
        raise ValueError(f"expected {act_name} [num_tokens, {features}] and {pool_name} [pool_rows, {features}], "
                         f"found {act_name} {tuple(act.shape)}, {pool_name} {tuple(pool.shape)}")
    if act.dtype not in (torch.float16, torch.bfloat16, torch.float32) or pool.dtype != act.dtype:
        raise ValueError(f"expected {act_name} and {pool_name} of one dtype among fp16/bf16/fp32, "
                         f"found {act.dtype} and {pool.dtype}")
    if act.stride(-1) != 1 or pool.stride(-1) != 1 or pool.device != act.device:
        raise ValueError(f"expected unit last stride on one device, found {act_name} {act.stride()} on "
                         f"{act.device}, {pool_name} {pool.stride()} on {pool.device}")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # TF32 is exact for 16-bit operands


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))  # tl.dot needs 16 at least


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: torch.Tensor,  # [pool_rows, in_features]
    meta: LoRABatchMetadata,
    *,
    split_k: int | None = None,  # force a split-K count (tests); None = heuristic
) -> torch.Tensor:  # h: [num_tokens, meta.max_rank] fp32, zero for tokens without LoRA and past each rank
    _check_weights(x, lora_a, "x", "lora_a")
    _check_meta(meta, x.device)
    num_tokens, in_features = x.shape
    h = torch.zeros(num_tokens, meta.max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or meta.max_rank == 0 or meta.max_tokens_per_segment == 0:
        return h
    num_segments = meta.num_segments
    block_r = _block_r(meta.max_rank)
    # 64 x 64-rank fp32 accumulators next to the x and A tiles spilled on sm_90 (tests/kernels/gpu_compile.py).
    # fp32 x and A tiles 64 wide spilled too, at 64 x 16 and at any rank 64, under Triton 3.7.1 (torch 2.13's
    # pin): half as wide then
    block_m = 16 if meta.max_tokens_per_segment <= 16 else 64 if block_r <= 32 else 32
    block_k = 32 if x.dtype == torch.float32 and (block_m == 64 or block_r >= 64) else 64
    m_blocks = triton.cdiv(meta.max_tokens_per_segment, block_m)
    if split_k is None:  # decode batches have few programs: split in_features to fill the GPU
        split_k = 1
        if x.is_cuda:
            target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = max(1, min(triton.cdiv(target, num_segments * m_blocks), triton.cdiv(in_features, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    _lora_shrink_kernel[(num_segments, m_blocks, split_k)](
        x, lora_a, h, meta.token_indices, meta.num_tokens_per_segment, meta.segment_start_offsets,
        meta.segment_rows, meta.segment_ranks, in_features, k_per_split, x.stride(0), lora_a.stride(0),
        meta.segment_rows.stride(0), h.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        PRECISION=_precision(x.dtype), ATOMIC=split_k > 1, num_warps=4)
    return h


def lora_expand(
    h: torch.Tensor,  # [num_tokens, meta.max_rank] fp32, from lora_shrink
    lora_b: torch.Tensor,  # [pool_rows, out_features]: row j is column j of PEFT's B
    y: torch.Tensor,  # [num_tokens, out_features]: updated in place
    meta: LoRABatchMetadata,
) -> None:
    _check_weights(y, lora_b, "y", "lora_b")
    _check_meta(meta, y.device)
    if (h.shape != (y.shape[0], meta.max_rank) or h.dtype != torch.float32 or h.device != y.device
            or (h.numel() and h.stride(-1) != 1)):
        raise ValueError(f"expected h fp32 [{y.shape[0]}, {meta.max_rank}] with unit last stride on {y.device}, "
                         f"found {h.dtype} {tuple(h.shape)} strides {h.stride()} on {h.device}")
    if y.shape[0] == 0 or meta.max_rank == 0 or meta.max_tokens_per_segment == 0:
        return
    out_features = y.shape[1]
    # fp32 h and B tiles at rank 64 next to a 64 x 64 accumulator spilled on sm_90 (gpu_compile.py)
    wide = y.dtype == torch.float32 and _block_r(meta.max_rank) >= 64
    block_m, block_n = (16 if meta.max_tokens_per_segment <= 16 else 32 if wide else 64), 64
    grid = (meta.num_segments, triton.cdiv(meta.max_tokens_per_segment, block_m), triton.cdiv(out_features, block_n))
    _lora_expand_kernel[grid](
        h, lora_b, y, meta.token_indices, meta.num_tokens_per_segment, meta.segment_start_offsets,
        meta.segment_rows, meta.segment_ranks, meta.segment_scaling, out_features, h.stride(0), lora_b.stride(0),
        meta.segment_rows.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(meta.max_rank),
        PRECISION=_precision(y.dtype), num_warps=4)


def lora_shrink_reference(x, lora_a, meta, *, split_k=None):
    h = torch.zeros(x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)  # [T, max_rank]
    for tokens, rows, _ in _segments(meta):
        h[tokens, :len(rows)] = x[tokens].float() @ lora_a[rows].float().T  # [n, r]
    return h


def lora_expand_reference(h, lora_b, y, meta):
    for tokens, rows, scale in _segments(meta):
        delta = scale * (h[tokens, :len(rows)] @ lora_b[rows].float())  # [n, out]
        y[tokens] = (y[tokens].float() + delta).to(y.dtype)


def _segments(meta: LoRABatchMetadata):
    """(token rows [n], pool rows [r], scaling) per segment with tokens and a rank, read from the
    device tensors the kernels read."""
    for s, (start, n, rank, scale) in enumerate(zip(
            meta.segment_start_offsets.tolist(), meta.num_tokens_per_segment.tolist(), meta.segment_ranks.tolist(),
            meta.segment_scaling.tolist())):
        if n > 0 and rank > 0:
            yield meta.token_indices[start:start + n].long(), meta.segment_rows[s, :rank].long(), scale


def add_lora(
    x: torch.Tensor,  # [num_tokens, in_features]: the projection's input
    y: torch.Tensor,  # [num_tokens, out_features]: the base projection's output, updated in place
    lora_a: torch.Tensor,  # [pool_rows, in_features]
    lora_b: torch.Tensor,  # [pool_rows, out_features]
    meta: LoRABatchMetadata,
) -> None:
    """y += scaling * (x @ A^T) @ B^T per token by its segment: the one call per projection.
    Triton kernels on CUDA, the grouped torch path elsewhere (chosen by device)."""
    if y.is_cuda:
        lora_expand(lora_shrink(x, lora_a, meta), lora_b, y, meta)
    else:
        add_lora_grouped(x, y, lora_a, lora_b, meta)
