"""Merge two partial attention outputs over disjoint key sets by their log-sum-exps.

If a attended to keys K_a and b to K_b, softmax over K_a + K_b is the lse-weighted average:
out = (e^lse_a * out_a + e^lse_b * out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).
A side that saw no key has lse -inf and weighs 0. Used by cascade attention to join the shared
prefix part with the own-pages part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_attn_states_kernel(
    a_ptr, lse_a_ptr, b_ptr, lse_b_ptr, out_ptr, lse_ptr,
    stride_at, stride_ah, stride_bt, stride_bh, stride_ot, stride_oh,
    stride_lat, stride_lah, stride_lbt, stride_lbh, stride_lt, stride_lh,
    num_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, STORE_LSE: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    lse_a = tl.load(lse_a_ptr + token * stride_lat + heads * stride_lah, mask=head_mask, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + token * stride_lbt + heads * stride_lbh, mask=head_mask, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_safe)  # [BLOCK_H]
    w_b = tl.exp(lse_b - m_safe)
    w_sum = w_a + w_b
    w_safe = tl.where(w_sum == 0.0, 1.0, w_sum)
    mask = head_mask[:, None]
    a = tl.load(a_ptr + token * stride_at + heads[:, None] * stride_ah + offs_d[None, :], mask=mask, other=0.0)
    b = tl.load(b_ptr + token * stride_bt + heads[:, None] * stride_bh + offs_d[None, :], mask=mask, other=0.0)
    out = (a.to(tl.float32) * (w_a / w_safe)[:, None] + b.to(tl.float32) * (w_b / w_safe)[:, None])  # [BLOCK_H, D]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_LSE:
        lse = tl.where(w_sum == 0.0, float("-inf"), m_safe + tl.log(w_safe))
        tl.store(lse_ptr + token * stride_lt + heads * stride_lh, lse, mask=head_mask)


def _check(out_a, lse_a, out_b, lse_b) -> None:
    if out_a.dim() != 3 or out_a.shape != out_b.shape or lse_a.shape != out_a.shape[:2] \
            or lse_b.shape != out_a.shape[:2]:
        raise ValueError(f"expected out_a, out_b [T, H, D] of one shape and lse_a, lse_b [T, H], found "
                         f"{tuple(out_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    if lse_a.dtype != torch.float32 or lse_b.dtype != torch.float32:
        raise ValueError(f"expected fp32 log-sum-exps, found {lse_a.dtype}, {lse_b.dtype}")
    head_dim = out_a.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1) or out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError(f"expected unit-stride head_dim a power of two >= 16, found {head_dim} with strides "
                         f"{out_a.stride()}, {out_b.stride()}")


def merge_attn_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]: attention over key set A
    lse_a: torch.Tensor,  # [num_tokens, num_heads] fp32, natural log
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]: attention over key set B
    lse_b: torch.Tensor,  # [num_tokens, num_heads] fp32
    *,
    out_dtype: torch.dtype | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over A + B: out [num_tokens, num_heads, head_dim] (and its lse [num_tokens, num_heads])."""
    _check(out_a, lse_a, out_b, lse_b)
    num_tokens, num_heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_dtype or out_a.dtype, device=out_a.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=out_a.device)
    if num_tokens:
        block_h = min(16, triton.next_power_of_2(num_heads))
        _merge_attn_states_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            out_a, lse_a, out_b, lse_b, out, lse, out_a.stride(0), out_a.stride(1), out_b.stride(0),
            out_b.stride(1), out.stride(0), out.stride(1), lse_a.stride(0), lse_a.stride(1),
            lse_b.stride(0), lse_b.stride(1), lse.stride(0), lse.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_H=block_h, STORE_LSE=return_lse, num_warps=4)
    return (out, lse) if return_lse else out


def merge_attn_states_reference(out_a, lse_a, out_b, lse_b, *, out_dtype=None, return_lse=False):
    lse = torch.logaddexp(lse_a, lse_b)  # [T, H]; -inf when both sides are empty
    # exp(-inf - -inf) is NaN: an empty pair contributes nothing.
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    out = (w_a * out_a.float() + w_b * out_b.float()).to(out_dtype or out_a.dtype)
    return (out, lse) if return_lse else out
