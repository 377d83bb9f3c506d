"""Shape, dtype and layout checks of the paged attention ops, shared by the torch reference and the
Triton launchers (torch only, so the CPU path needs no triton)."""

from __future__ import annotations

import torch


def check_attention_geometry(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q [T, H, D] against k/v caches [pages, page_size, Hkv, D]: shared by the reference and the launchers."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, H, D] and k/v caches [pages, page_size, Hkv, D] of one shape, "
                         f"found q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"expected head_dim {head_dim} and num_heads divisible by num_kv_heads, "
                         f"found cache head_dim {k_cache.shape[3]}, {num_heads} heads / {num_kv_heads} kv heads")


def check_paged_inputs(q, k_cache, v_cache, seq_lens, page_table, prefix_lens, prefix_page_table, num_seqs) -> None:
    """Shape, dtype and layout checks shared by the Triton attention launchers."""
    check_attention_geometry(q, k_cache, v_cache)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise ValueError(f"expected q, k_cache, v_cache of one dtype among fp16/bf16/fp32, found "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    head_dim = q.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"expected head_dim a power of two >= 16, found {head_dim}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError(f"expected unit-stride head_dim and k/v caches of one layout, found q strides "
                         f"{q.stride()}, k {k_cache.stride()}, v {v_cache.stride()}")
    for name, t, dims in (("seq_lens", seq_lens, 1), ("prefix_lens", prefix_lens, 1),
                          ("page_table", page_table, 2), ("prefix_page_table", prefix_page_table, 2)):
        if t.dim() != dims or t.shape[0] != num_seqs or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected {name} int32/int64 with {dims} dims and {num_seqs} rows, "
                             f"found {t.dtype} {tuple(t.shape)}")
        if t.device != q.device or (dims == 2 and t.stride(-1) != 1):
            raise ValueError(f"expected {name} on {q.device} with unit last stride, found {t.device} {t.stride()}")
