"""Batched multi-adapter LoRA over tokens grouped by adapter slot (SGMV-style), Triton on CUDA.

  shrink: h[t] = x[t] @ A[slot(t)]^T                  h: [num_tokens, max_rank] fp32
  expand: y[t] += scaling[slot(t)] * h[t] @ B[slot(t)]^T

Adapters live in preallocated stacked slots, addressed by stride (no pointer tables):
lora_a [num_slots, max_rank, in_features], lora_b [num_slots, out_features, max_rank]; a smaller
rank is zero-padded up to max_rank. The batch's tokens are sorted by slot once per step
(`lora_batch_metadata`); every projection of every layer reuses that metadata through `add_lora`.
A segment with slot -1 (plain backbone tokens) is skipped: its rows of y are left untouched.

triton is imported softly: CPU-only installs have none, and `add_lora` then runs the references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # kernels below are never launched without triton; the references still run
    triton = tl = None

    def _jit(fn):
        return fn


@dataclass
class LoRABatchMetadata:
    """Tokens grouped by adapter slot; built once per step, shared by every LoRA projection."""

    token_indices: torch.Tensor  # [num_tokens] int32: token rows of x / y, sorted by slot
    num_tokens_per_slot: torch.Tensor  # [num_segments] int32: may be 0 (empty slot)
    slot_start_offsets: torch.Tensor  # [num_segments] int32: first entry of each segment in token_indices
    slot_ids: torch.Tensor  # [num_segments] int32: adapter slot of each segment, -1 = no LoRA
    max_tokens_per_slot: int  # host-side maximum of num_tokens_per_slot: sizes the launch grid


def lora_batch_metadata(token_slots: torch.Tensor) -> LoRABatchMetadata:
    """token_slots: [num_tokens] slot of each token, -1 = none. One sort and one sync per step."""
    order = torch.argsort(token_slots, stable=True)
    slot_ids, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    return LoRABatchMetadata(order.to(torch.int32), counts.to(torch.int32), starts.to(torch.int32),
                             slot_ids.to(torch.int32), int(counts.max()) if counts.numel() else 0)


@_jit
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, h_ptr, token_indices_ptr, num_tokens_per_slot_ptr, slot_start_offsets_ptr, slot_ids_ptr,
    in_features, max_rank, k_per_split, stride_xt, stride_as, stride_ar, stride_ht,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """One program: BLOCK_M tokens of one segment x one slice of in_features (split-K)."""
    segment = tl.program_id(0)
    m_block = tl.program_id(1)
    k_split = tl.program_id(2)
    slot = tl.load(slot_ids_ptr + segment)
    num_tokens = tl.load(num_tokens_per_slot_ptr + segment)
    if (slot < 0) | (m_block * BLOCK_M >= num_tokens):
        return
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_tokens
    tokens = tl.load(token_indices_ptr + tl.load(slot_start_offsets_ptr + segment) + rows, mask=row_mask, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = lora_a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar  # [BLOCK_R, 1]
    x_base = x_ptr + tokens.to(tl.int64)[:, None] * stride_xt  # [BLOCK_M, 1]
    k_start = k_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(x_base + cols[None, :], mask=row_mask[:, None] & (cols < k_end)[None, :], other=0.0)
        a = tl.load(a_base + cols[None, :], mask=(offs_r < max_rank)[:, None] & (cols < k_end)[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_R]
    h_ptrs = h_ptr + tokens.to(tl.int64)[:, None] * stride_ht + offs_r[None, :]
    h_mask = row_mask[:, None] & (offs_r < max_rank)[None, :]
    if ATOMIC:  # split-K partial sums meet in the fp32 h, which starts at zero
        tl.atomic_add(h_ptrs, acc, mask=h_mask)
    else:
        tl.store(h_ptrs, acc, mask=h_mask)


@_jit
def _lora_expand_kernel(
    h_ptr, lora_b_ptr, y_ptr, scaling_ptr, token_indices_ptr, num_tokens_per_slot_ptr, slot_start_offsets_ptr,
    slot_ids_ptr, out_features, max_rank, stride_ht, stride_bs, stride_bn, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M tokens of one segment x BLOCK_N output features. A token belongs to
    one segment, so read-add-write of y needs no atomics."""
    segment = tl.program_id(0)
    m_block = tl.program_id(1)
    n_block = tl.program_id(2)
    slot = tl.load(slot_ids_ptr + segment)
    num_tokens = tl.load(num_tokens_per_slot_ptr + segment)
    if (slot < 0) | (m_block * BLOCK_M >= num_tokens):
        return
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_tokens
    tokens = tl.load(token_indices_ptr + tl.load(slot_start_offsets_ptr + segment) + rows, mask=row_mask, other=0)
    tokens = tokens.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < max_rank
    n_mask = offs_n < out_features
    h = tl.load(h_ptr + tokens[:, None] * stride_ht + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    b = tl.load(lora_b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
    delta = tl.dot(h, tl.trans(b), input_precision=PRECISION) * tl.load(scaling_ptr + slot)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :]
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _check_meta(meta: LoRABatchMetadata, device: torch.device) -> None:
    num_segments = meta.slot_ids.shape[0]
    for name in ("token_indices", "num_tokens_per_slot", "slot_start_offsets", "slot_ids"):
        t = getattr(meta, name)
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or t.device != device:
            raise ValueError(f"expected {name} a 1-d int32/int64 tensor on {device}, "
                             f"found {t.dtype} {tuple(t.shape)} on {t.device}")
        if name != "token_indices" and t.shape[0] != num_segments:
            raise ValueError(f"expected {name} with {num_segments} segments (as slot_ids), found {tuple(t.shape)}")


def _check_weights(act: torch.Tensor, weights: torch.Tensor, act_name: str, w_name: str, features: int) -> None:
    if act.dim() != 2 or weights.dim() != 3 or act.shape[1] != features:
        raise ValueError(f"expected {act_name} [num_tokens, {features}] and {w_name} 3-d, "
                         f"found {act_name} {tuple(act.shape)}, {w_name} {tuple(weights.shape)}")
    if act.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weights.dtype != act.dtype:
        raise ValueError(f"expected {act_name} and {w_name} of one dtype among fp16/bf16/fp32, "
                         f"found {act.dtype} and {weights.dtype}")
    if act.stride(-1) != 1 or weights.stride(-1) != 1 or weights.device != act.device:
        raise ValueError(f"expected unit last stride on one device, found {act_name} {act.stride()} on "
                         f"{act.device}, {w_name} {weights.stride()} on {weights.device}")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # TF32 is exact for 16-bit operands


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: torch.Tensor,  # [num_slots, max_rank, in_features]
    meta: LoRABatchMetadata,
    *,
    split_k: int | None = None,  # force a split-K count (tests); None = heuristic
) -> torch.Tensor:  # h: [num_tokens, max_rank] fp32, zero for tokens without LoRA
    _check_weights(x, lora_a, "x", "lora_a", lora_a.shape[-1] if lora_a.dim() == 3 else -1)
    _check_meta(meta, x.device)
    num_tokens, in_features = x.shape
    max_rank = lora_a.shape[1]
    h = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    num_segments = meta.slot_ids.shape[0]
    if num_tokens == 0 or num_segments == 0 or meta.max_tokens_per_slot == 0:
        return h
    block_r = max(16, triton.next_power_of_2(max_rank))
    # 64 x 64-rank fp32 accumulators next to the x and A tiles spilled on sm_90 (tests/kernels/gpu_compile.py);
    # so did 64 x 16 with fp32 x and A tiles 64 wide under Triton 3.7.1 (torch 2.13's pin): half as wide then
    block_m = 16 if meta.max_tokens_per_slot <= 16 else 64 if block_r <= 32 else 32
    block_k = 32 if x.dtype == torch.float32 and block_m == 64 else 64
    m_blocks = triton.cdiv(meta.max_tokens_per_slot, block_m)
    if split_k is None:  # decode batches have few programs: split in_features to fill the GPU
        split_k = 1
        if x.is_cuda:
            target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = max(1, min(triton.cdiv(target, num_segments * m_blocks), triton.cdiv(in_features, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    _lora_shrink_kernel[(num_segments, m_blocks, split_k)](
        x, lora_a, h, meta.token_indices, meta.num_tokens_per_slot, meta.slot_start_offsets, meta.slot_ids,
        in_features, max_rank, k_per_split, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        PRECISION=_precision(x.dtype), ATOMIC=split_k > 1, num_warps=4)
    return h


def lora_expand(
    h: torch.Tensor,  # [num_tokens, max_rank] fp32, from lora_shrink
    lora_b: torch.Tensor,  # [num_slots, out_features, max_rank]
    y: torch.Tensor,  # [num_tokens, out_features]: updated in place
    scaling: torch.Tensor,  # [num_slots] fp32: alpha / rank of each slot
    meta: LoRABatchMetadata,
) -> None:
    _check_weights(y, lora_b, "y", "lora_b", lora_b.shape[1] if lora_b.dim() == 3 else -1)
    _check_meta(meta, y.device)
    max_rank = lora_b.shape[2]
    if h.shape != (y.shape[0], max_rank) or h.dtype != torch.float32 or h.stride(-1) != 1:
        raise ValueError(f"expected h fp32 [{y.shape[0]}, {max_rank}] with unit last stride, "
                         f"found {h.dtype} {tuple(h.shape)} strides {h.stride()}")
    if scaling.shape != (lora_b.shape[0],) or scaling.dtype != torch.float32:
        raise ValueError(f"expected scaling fp32 [{lora_b.shape[0]}], found {scaling.dtype} {tuple(scaling.shape)}")
    num_segments = meta.slot_ids.shape[0]
    if y.shape[0] == 0 or num_segments == 0 or meta.max_tokens_per_slot == 0:
        return
    out_features = y.shape[1]
    block_m, block_n = (16 if meta.max_tokens_per_slot <= 16 else 64), 64
    grid = (num_segments, triton.cdiv(meta.max_tokens_per_slot, block_m), triton.cdiv(out_features, block_n))
    _lora_expand_kernel[grid](
        h, lora_b, y, scaling, meta.token_indices, meta.num_tokens_per_slot, meta.slot_start_offsets,
        meta.slot_ids, out_features, max_rank, h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
        PRECISION=_precision(y.dtype), num_warps=4)


def lora_shrink_reference(x, lora_a, meta, *, split_k=None):
    h = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for rows, slot in _segments(meta):
        h[rows] = x[rows].float() @ lora_a[slot].float().T
    return h


def lora_expand_reference(h, lora_b, y, scaling, meta):
    for rows, slot in _segments(meta):
        y[rows] = (y[rows].float() + scaling[slot] * (h[rows] @ lora_b[slot].float().T)).to(y.dtype)


def _segments(meta: LoRABatchMetadata):
    """(token rows, slot) per non-empty LoRA segment."""
    for start, n, slot in zip(meta.slot_start_offsets.tolist(), meta.num_tokens_per_slot.tolist(),
                              meta.slot_ids.tolist()):
        if slot >= 0 and n > 0:
            yield meta.token_indices[start:start + n].long(), slot


@dataclass
class LoRASegment:
    """The tokens of one adapter slot, for the host-side path (built once per step from host data)."""

    rows: torch.Tensor  # [n] int64 token rows of x / y
    slot: int
    rank: int  # the adapter's own rank: the zero-padded rest of max_rank is skipped
    scale: float


def add_lora_segments(
    x: torch.Tensor,  # [num_tokens, in_features]
    y: torch.Tensor,  # [num_tokens, out_features], updated in place
    lora_a: torch.Tensor,  # [num_slots, max_rank, in_features]
    lora_b: torch.Tensor,  # [num_slots, out_features, max_rank]
    segments: list[LoRASegment],
) -> None:
    """The CPU path of the batched LoRA: per segment, shrink and expand at the adapter's real rank
    and one fused index_add_ into y. Where few tokens carry LoRA (the usual mixed batch), this
    costs a handful of small ops per adapter instead of work over every token or padded rank."""
    for seg in segments:
        a = lora_a[seg.slot, :seg.rank].float()  # [r, in]
        b = lora_b[seg.slot, :, :seg.rank].float()  # [out, r]
        h = x.index_select(0, seg.rows).float() @ a.T  # [n, r]
        y.index_add_(0, seg.rows, (h @ b.T).mul_(seg.scale).to(y.dtype))


def add_lora(
    x: torch.Tensor,  # [num_tokens, in_features]: the projection's input
    y: torch.Tensor,  # [num_tokens, out_features]: the base projection's output, updated in place
    lora_a: torch.Tensor,  # [num_slots, max_rank, in_features]
    lora_b: torch.Tensor,  # [num_slots, out_features, max_rank]
    scaling: torch.Tensor,  # [num_slots] fp32
    meta: LoRABatchMetadata,
) -> None:
    """y += scaling * (x @ A^T) @ B^T per token by its slot: the one call per projection.
    Triton kernels on CUDA, the torch references elsewhere (chosen by device)."""
    if y.is_cuda:
        lora_expand(lora_shrink(x, lora_a, meta), lora_b, y, scaling, meta)
    else:
        lora_expand_reference(lora_shrink_reference(x, lora_a, meta), lora_b, y, scaling, meta)
