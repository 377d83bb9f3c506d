"""Write this step's keys and values into the paged KV cache."""

import torch


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim], any strides
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, flat slot = page * page_size + offset
) -> None:
    """One scatter per cache (index_copy_ is a single op on CPU and CUDA), into whichever of the
    two physical layouts the cache uses: token-major or head-major (the CPU engine's)."""
    for src, cache in ((k, k_cache), (v, v_cache)):
        num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
        by_head = cache.permute(2, 0, 1, 3)  # [Hkv, num_pages, page_size, D]
        if by_head.is_contiguous():
            by_head.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, src.transpose(0, 1).to(cache.dtype))
        else:
            cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, src.to(cache.dtype))
