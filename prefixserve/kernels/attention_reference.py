"""fp32 torch references of the Triton paged attention launchers, with their signatures: what the
kernels' tests compare against and what cascade attention falls back to."""

from __future__ import annotations

import itertools

import torch


def prefill_attention_reference(
    q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table, scale, *,
    return_lse=False, out_dtype=None,
):
    """fp32 torch reference with the launcher's signature, one sequence at a time."""
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1:3]
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for s, (start, end) in enumerate(itertools.pairwise(bounds)):
        if end == start:
            continue
        seq_len, prefix_len = int(seq_lens[s]), int(prefix_lens[s])
        own = page_table[s, : -(-seq_len // page_size)].long()
        pre = prefix_page_table[s, : -(-prefix_len // page_size)].long()
        k = torch.cat([k_cache[pre].flatten(0, 1)[:prefix_len], k_cache[own].flatten(0, 1)[:seq_len]])  # [L, Hkv, D]
        v = torch.cat([v_cache[pre].flatten(0, 1)[:prefix_len], v_cache[own].flatten(0, 1)[:seq_len]])
        query_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]  # [n_q, 1]
        key_pos = torch.arange(-prefix_len, seq_len, device=q.device)[None, :]  # prefix keys sit before 0
        qg = q[start:end].float().view(end - start, num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n_q, D]
        scores = torch.matmul(qg, k.float().permute(1, 2, 0)[:, None]) * scale  # [Hkv, G, n_q, L]
        scores.masked_fill_(key_pos > query_pos, float("-inf"))
        seq_lse = torch.logsumexp(scores, -1)  # [Hkv, G, n_q]
        o = torch.matmul(torch.softmax(scores, -1), v.float().transpose(0, 1)[:, None])  # [Hkv, G, n_q, D]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(end - start, num_heads, head_dim).to(out.dtype)
        lse[start:end] = seq_lse.permute(2, 0, 1).reshape(end - start, num_heads)
    return (out, lse) if return_lse else out


def decode_attention_reference(
    q, k_cache, v_cache, seq_lens, page_table, prefix_lens, prefix_page_table, scale, *,
    max_kv_len=None, num_splits=None, return_lse=False, out_dtype=None,
):
    """Torch reference with the launcher's signature: decode is prefill with one query per sequence.
    max_kv_len and num_splits only steer the kernel's parallelism and are ignored here."""
    cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, prefix_lens,
                                       prefix_page_table, scale, return_lse=return_lse, out_dtype=out_dtype)
