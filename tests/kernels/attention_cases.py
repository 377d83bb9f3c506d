"""Random paged batches for the attention kernel tests, and a dense naive attention to check the
references against. Pages are handed out in a random order so page tables are non-contiguous, and
every unused cache slot holds random values, so a kernel that reads past a length is caught."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol = rtol


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, H, D]
    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    page_table: torch.Tensor  # [num_seqs, max_pages] int32
    prefix_lens: torch.Tensor  # [num_seqs] int32
    prefix_page_table: torch.Tensor  # [num_seqs, max_prefix_pages] int32
    seq_tasks: list[int]  # task index of each sequence
    task_prefix_lens: torch.Tensor  # [num_tasks] int32
    task_prefix_page_table: torch.Tensor  # [num_tasks, max_prefix_pages] int32
    dense_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per sequence: prefix + own K, V [L, Hkv, D]

    def paged_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.page_table,
                self.prefix_lens, self.prefix_page_table)

    def cu_seqs_per_task(self) -> torch.Tensor:
        """[num_tasks + 1]; only meaningful when sequences are sorted by task."""
        counts = torch.bincount(torch.tensor(self.seq_tasks), minlength=len(self.task_prefix_lens))
        return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(self.q.device)


def make_batch(task_prefix_lens: list[int], seqs: list[tuple[int, int, int]], *, num_heads: int,
               num_kv_heads: int, head_dim: int, page_size: int = 16, dtype=torch.float32,
               seed: int = 0) -> Batch:
    """seqs: (task index, seq_len, query_len) per sequence; seq_len counts the queries."""
    gen = torch.Generator().manual_seed(seed)
    lens = list(task_prefix_lens) + [s for _, s, _ in seqs]
    needed = sum(-(-n // page_size) for n in lens)
    num_pages = needed + 3
    free = torch.randperm(num_pages, generator=gen).tolist()
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen)

    def allocate(n: int) -> list[int]:
        return [free.pop() for _ in range(-(-n // page_size))]

    def dense(pages: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return k_cache[pages].flatten(0, 1)[:n], v_cache[pages].flatten(0, 1)[:n]

    task_pages = [allocate(n) for n in task_prefix_lens]
    seq_pages = [allocate(s) for _, s, _ in seqs]
    dense_kv = []
    for (task, seq_len, _), pages in zip(seqs, seq_pages):
        pk, pv = dense(task_pages[task], task_prefix_lens[task])
        ok, ov = dense(pages, seq_len)
        dense_kv.append((torch.cat([pk, ok]).to(dtype).float(), torch.cat([pv, ov]).to(dtype).float()))

    def table(rows: list[list[int]]) -> torch.Tensor:
        width = max([len(r) for r in rows] + [1])
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).reshape(len(rows), width)

    query_lens = [n for _, _, n in seqs]
    cu = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen)
    to = {"device": DEVICE}
    return Batch(
        q=q.to(dtype).to(**to), k_cache=k_cache.to(dtype).to(**to), v_cache=v_cache.to(dtype).to(**to),
        cu_seqlens_q=cu.to(**to), seq_lens=torch.tensor([s for _, s, _ in seqs], dtype=torch.int32, **to),
        page_table=table(seq_pages).to(**to),
        prefix_lens=torch.tensor([task_prefix_lens[t] for t, _, _ in seqs], dtype=torch.int32, **to),
        prefix_page_table=table([task_pages[t] for t, _, _ in seqs]).to(**to),
        seq_tasks=[t for t, _, _ in seqs],
        task_prefix_lens=torch.tensor(task_prefix_lens, dtype=torch.int32, **to),
        task_prefix_page_table=table(task_pages).to(**to), dense_kv=dense_kv)


def naive_attention(batch: Batch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention one query token at a time over the logical (unpaged) K/V, fp32.
    Returns out [T, H, D] and the log-sum-exp of the scaled scores [T, H]."""
    num_heads = batch.q.shape[1]
    out = torch.empty(batch.q.shape, dtype=torch.float32)
    lse = torch.empty(batch.q.shape[:2], dtype=torch.float32)
    cu = batch.cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(batch.dense_kv):
        group = num_heads // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [L, H, D]
        prefix_len, seq_len = int(batch.prefix_lens[s]), int(batch.seq_lens[s])
        for i, t in enumerate(range(cu[s], cu[s + 1])):
            pos = seq_len - (cu[s + 1] - cu[s]) + i
            visible = prefix_len + pos + 1
            q = batch.q[t].float().cpu()  # [H, D]
            scores = torch.einsum("hd,lhd->hl", q, k[:visible]) * scale
            out[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[:visible])
            lse[t] = scores.logsumexp(-1)
    return out, lse


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)
