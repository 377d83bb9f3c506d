"""Mixed-prefix paged attention over a flat varlen batch (the torch reference).

Every sequence attends, in one softmax, to two KV segments:
  1. its task's prefix: shared, read-only pages (length `prefix_lens[s]`, may be 0), all visible;
  2. its own pages: `seq_lens[s]` tokens, the last `query_len` of which are this step's queries,
     visible causally.
Decode (one query per sequence), chunked prefill and prefix-cache hits are the same call with
different query lengths. The Triton kernels take exactly this signature; `paged_attention()`
picks them on CUDA (cascade attention when the step's plan says so) and this reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.kernels.attention_checks import check_attention_geometry
from prefixserve.kernels.cascade_plan import CascadePlan


@dataclass
class PagedAttentionMetadata:
    """Per-step batch layout shared by every layer. Built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot (page * page_size + offset) of each new token
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: query token offsets per sequence
    seq_lens: torch.Tensor  # [num_seqs] int32: own KV length after this step (context + queries)
    page_table: torch.Tensor  # [num_seqs, max_pages] int32: own pages, padded with 0
    prefix_lens: torch.Tensor  # [num_seqs] int32: prefix length, 0 = no prefix
    prefix_page_table: torch.Tensor  # [num_seqs, max_prefix_pages] int32: prefix pages, padded with 0
    max_query_len: int  # host-side maxima: launch grids and reference grouping need them without a sync
    max_seq_len: int
    max_prefix_len: int
    reference_plan: ReferencePlan | None = None  # CPU path: gather indices and masks, same for every layer
    cascade: CascadePlan | None = None  # CUDA path: set when should_use_cascade chose cascade for this step


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention for every query token of the batch. q: [num_tokens, num_heads, head_dim].
    CUDA tensors run the Triton kernels (imported here, so CPU-only installs need no triton);
    anything else runs the torch reference."""
    if q.is_cuda:
        if meta.cascade is not None:  # long task prefixes shared by many sequences: each read once
            from prefixserve.kernels.cascade_attention import cascade_paged_attention

            return cascade_paged_attention(q, k_cache, v_cache, meta.cascade, scale)
        if meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0]:  # every sequence decodes
            from prefixserve.kernels.decode_attention import decode_attention

            return decode_attention(
                q, k_cache, v_cache, meta.seq_lens, meta.page_table, meta.prefix_lens, meta.prefix_page_table,
                scale, max_kv_len=meta.max_seq_len + meta.max_prefix_len,
            )
        from prefixserve.kernels.prefill_attention import prefill_attention

        return prefill_attention(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.page_table,
            meta.prefix_lens, meta.prefix_page_table, scale,
        )
    if meta.reference_plan is None:  # built by the first layer, reused by the others
        meta.reference_plan = ReferencePlan.build(meta.cu_seqlens_q, meta.seq_lens, meta.page_table,
                                                  meta.prefix_lens, meta.prefix_page_table, k_cache.shape)
    return _attend(q, k_cache, v_cache, meta.reference_plan, scale)


def paged_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1]
    seq_lens: torch.Tensor,  # [num_seqs]
    page_table: torch.Tensor,  # [num_seqs, max_pages]
    prefix_lens: torch.Tensor,  # [num_seqs]
    prefix_page_table: torch.Tensor,  # [num_seqs, max_prefix_pages]
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """fp32-accumulated reference. Decode rows are batched (one gather, one batched matmul over all
    KV heads and sequences); sequences with several queries go one at a time with a causal mask."""
    _check_shapes(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table)
    plan = ReferencePlan.build(cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table, k_cache.shape)
    return _attend(q, k_cache, v_cache, plan, scale)


@dataclass
class ReferencePlan:
    """Which cache pages each query reads and which of their slots it may see. Depends only on the
    batch layout, so one plan serves every layer of a step. Rows index the cache viewed head-major by
    page, [Hkv * num_pages, page_size * D] (row = head * num_pages + page), so one dim-0 gather
    (torch's fast path) fetches every (head, sequence) run contiguously, a whole page per index: the
    same bytes as gathering by slot, from an index 16x shorter (the gather alone ~10 % faster)."""

    decode_token_idx: torch.Tensor | None  # [n] query rows of sequences with one query
    decode_rows: torch.Tensor | None  # [Hkv * n * Lp] per head, per sequence: prefix pages, then own
    decode_bias: torch.Tensor | None  # [Hkv * n, 1, L] additive mask: 0 visible, -inf padding; L = Lp * page_size
    extends: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (first row, n_q, rows [Hkv * Lp], visible [n_q, L])

    @classmethod
    def build(cls, cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table, cache_shape) -> ReferencePlan:
        num_pages, page_size, num_kv_heads = cache_shape[0], cache_shape[1], cache_shape[2]
        device = cu_seqlens_q.device
        head_offsets = torch.arange(num_kv_heads, device=device)[:, None] * num_pages  # [Hkv, 1]
        starts = cu_seqlens_q[:-1].tolist()
        query_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        decode = [s for s, n in enumerate(query_lens) if n == 1]
        token_idx = rows = bias = None
        if decode:
            seq_idx = torch.tensor(decode, device=device)
            token_idx = cu_seqlens_q[:-1].long()[seq_idx]
            own_pages, own_valid = _segment(page_table[seq_idx], seq_lens[seq_idx], page_size)
            pre_pages, pre_valid = _segment(prefix_page_table[seq_idx], prefix_lens[seq_idx], page_size)
            rows = (head_offsets + torch.cat([pre_pages, own_pages], 1).flatten()[None, :]).flatten()
            visible = torch.cat([pre_valid, own_valid], 1)  # [n, L]
            bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
            bias = bias[:, None, :].repeat(num_kv_heads, 1, 1)
        extends = []
        for s, n in enumerate(query_lens):
            if n > 1:
                seq_len, prefix_len = int(seq_lens[s]), int(prefix_lens[s])
                own_pages, own_valid = _segment(page_table[s:s + 1], seq_lens[s:s + 1], page_size)
                pre_pages, pre_valid = _segment(prefix_page_table[s:s + 1], prefix_lens[s:s + 1], page_size)
                # key position of every gathered slot: the prefix's come first (negative), padding never visible
                own_pos = torch.arange(own_valid.shape[1], device=device)
                pre_pos = torch.arange(pre_valid.shape[1], device=device) - prefix_len
                query_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]  # own positions
                visible = torch.cat([pre_valid[0], own_valid[0]])[None, :] & (
                    torch.cat([pre_pos, own_pos])[None, :] <= query_pos)  # [n_q, L]
                seq_rows = (head_offsets + torch.cat([pre_pages[0], own_pages[0]])[None, :]).flatten()
                extends.append((starts[s], n, seq_rows, visible))
        return cls(token_idx, rows, bias, extends)


def _segment(pages: torch.Tensor, lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pages [n, P] (padded), lens [n] -> pages [n, Lp] and slot validity [n, Lp * page_size], Lp = pages
    needed for max(lens)."""
    num_pages = -(-int(lens.max()) // page_size) if lens.numel() else 0
    valid = torch.arange(num_pages * page_size, device=pages.device)[None, :] < lens[:, None]
    return pages[:, :num_pages].long(), valid


def head_major_pages(cache: torch.Tensor) -> torch.Tensor:
    """cache: [num_pages, page_size, Hkv, D] (any strides) -> [Hkv * num_pages, page_size * D]. Free
    when the cache is stored head-major (the engine's CPU layout); a copy for other layouts (tests)."""
    num_pages, page_size, num_kv_heads, head_dim = cache.shape
    return cache.permute(2, 0, 1, 3).reshape(num_kv_heads * num_pages, page_size * head_dim)


def _attend(q, k_cache, v_cache, plan: ReferencePlan, scale: float) -> torch.Tensor:
    num_kv_heads = k_cache.shape[2]
    k_pages, v_pages = head_major_pages(k_cache), head_major_pages(v_cache)  # [Hkv * num_pages, page_size * D]
    out = torch.empty_like(q)
    if plan.decode_token_idx is not None:
        out[plan.decode_token_idx] = _decode_rows(q[plan.decode_token_idx], k_pages, v_pages, plan, num_kv_heads,
                                                  scale)
    for start, n, rows, visible in plan.extends:
        out[start:start + n] = _extend_one(q[start:start + n], k_pages, v_pages, rows, visible, num_kv_heads, scale)
    return out


def _check_shapes(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, prefix_lens, prefix_page_table) -> None:
    check_attention_geometry(q, k_cache, v_cache)
    num_seqs = seq_lens.shape[0]
    if (cu_seqlens_q.shape[0] != num_seqs + 1 or page_table.shape[0] != num_seqs
            or prefix_lens.shape[0] != num_seqs or prefix_page_table.shape[0] != num_seqs):
        raise ValueError(f"expected per-sequence tensors for {num_seqs} sequences, found cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)}, page_table {tuple(page_table.shape)}, prefix_lens "
                         f"{tuple(prefix_lens.shape)}, prefix_page_table {tuple(prefix_page_table.shape)}")


def _decode_rows(q, k_pages, v_pages, plan: ReferencePlan, num_kv_heads, scale):
    # q: [n, H, D]; each row is the newest token of its sequence, so only padding is masked.
    n, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    k = k_pages.index_select(0, plan.decode_rows).float().view(num_kv_heads * n, -1, head_dim)  # [Hkv*n, L, D]
    v = v_pages.index_select(0, plan.decode_rows).float().view(num_kv_heads * n, -1, head_dim)
    qg = q.float().view(n, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads * n, group, head_dim)
    probs = torch.baddbmm(plan.decode_bias, qg, k.transpose(1, 2), alpha=scale).softmax(-1)  # [Hkv*n, G, L]
    out = torch.bmm(probs, v).view(num_kv_heads, n, group, head_dim)
    return out.transpose(0, 1).reshape(n, num_heads, head_dim).to(q.dtype)


def _extend_one(q, k_pages, v_pages, rows, visible, num_kv_heads, scale):
    # q: [n_q, H, D] at own positions seq_len - n_q ... seq_len - 1; visible: [n_q, L].
    n_q, num_heads, head_dim = q.shape
    k = k_pages.index_select(0, rows).float().view(num_kv_heads, -1, head_dim)  # [Hkv, L, D]
    v = v_pages.index_select(0, rows).float().view(num_kv_heads, -1, head_dim)
    qg = q.float().view(n_q, num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n_q, D]
    scores = torch.matmul(qg, k.transpose(1, 2)[:, None]).mul_(scale)  # [Hkv, G, n_q, L]
    scores.masked_fill_(~visible, float("-inf"))
    out = torch.matmul(scores.softmax(-1), v[:, None])  # [Hkv, G, n_q, D]
    return out.permute(2, 0, 1, 3).reshape(n_q, num_heads, head_dim).to(q.dtype)
