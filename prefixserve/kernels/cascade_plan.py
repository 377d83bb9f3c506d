"""When and how a step runs cascade attention: group its sequences by task prefix, ask
`should_use_cascade`, and if it says yes, lay the batch out sorted by task (what the cascade kernel
needs), with the token permutation that maps the sorted rows back to the batch. Host-side numpy
and torch only (no triton), so the model runner builds it on any install; only CUDA runs it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_PREFIX_LEN = 128  # a shorter prefix is cheaper to re-read than two more launches and a merge
MIN_SEQS_PER_TASK = 4  # below this the shared tile is mostly padding again
MIN_SAVED_TOKENS = 4096  # prefix KV tokens (per KV head) the per-sequence path would re-read


def should_use_cascade(seqs_per_task: Sequence[int], task_prefix_lens: Sequence[int]) -> bool:
    """Host-side choice between cascade and the per-sequence mixed-prefix kernels for one step.

    Cascade saves re-reading each task's prefix once per extra sequence, (n - 1) * prefix_len
    tokens per task, and fills the decode tile with many sequences' queries. It costs two more
    launches (prefix stage, merge: a few microseconds), an fp32 round trip of two partial outputs
    per query token, a gather and a scatter of the queries, and its prefix stage has no KV split.
    Concurrent readers of the same pages partly hit in L2 anyway, so only a large duplicated volume
    is worth it: long prefixes shared by many sequences. Thresholds are first estimates, not yet
    measured on a GPU; benchmarks/kernels.py measures the trade.
    """
    saved = sum((n - 1) * p for n, p in zip(seqs_per_task, task_prefix_lens)
                if n >= MIN_SEQS_PER_TASK and p >= MIN_PREFIX_LEN)
    return saved >= MIN_SAVED_TOKENS


@dataclass
class CascadePlan:
    """The step's sequences sorted by task prefix (plain sequences form a task of prefix 0)."""

    token_order: torch.Tensor  # [num_tokens] int64: batch row of each sorted query row
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32, sorted order
    seq_lens: torch.Tensor  # [num_seqs] int32, sorted order
    page_table: torch.Tensor  # [num_seqs, max_pages] int32, sorted order
    cu_seqs_per_task: torch.Tensor  # [num_tasks + 1] int32: task t owns sorted sequences cu[t]:cu[t+1]
    task_prefix_lens: torch.Tensor  # [num_tasks] int32
    task_prefix_page_table: torch.Tensor  # [num_tasks, max_prefix_pages] int32
    max_tokens_per_task: int
    max_query_len: int


def group_by_prefix(prefix_lens: np.ndarray, prefix_page_table: np.ndarray) -> list[list[int]]:
    """Sequence indices per distinct task prefix, in order of first appearance. A task version's
    prefix owns its pages, so (length, first page) names it; prefix 0 is one group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for s, n in enumerate(prefix_lens.tolist()):
        key = (n, int(prefix_page_table[s, 0])) if n else (0, -1)
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def plan_cascade(cu_seqlens: np.ndarray, seq_lens: np.ndarray, page_table: np.ndarray, prefix_lens: np.ndarray,
                 prefix_page_table: np.ndarray, device: torch.device | str) -> CascadePlan | None:
    """The plan for one step, or None when should_use_cascade says the per-sequence kernels win."""
    groups = group_by_prefix(prefix_lens, prefix_page_table)
    group_prefix = [int(prefix_lens[g[0]]) for g in groups]
    if not should_use_cascade([len(g) for g in groups], group_prefix):
        return None
    order = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    query_lens = np.diff(cu_seqlens)[order]
    sorted_cu = np.zeros(len(order) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=sorted_cu[1:])
    token_order = np.concatenate([np.arange(cu_seqlens[s], cu_seqlens[s + 1], dtype=np.int64) for s in order])
    cu_seqs_per_task = np.zeros(len(groups) + 1, dtype=np.int32)
    np.cumsum([len(g) for g in groups], out=cu_seqs_per_task[1:])
    task_tokens = [int(query_lens[cu_seqs_per_task[t]:cu_seqs_per_task[t + 1]].sum()) for t in range(len(groups))]

    def to(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    return CascadePlan(
        token_order=to(token_order), cu_seqlens_q=to(sorted_cu), seq_lens=to(seq_lens[order]),
        page_table=to(page_table[order]), cu_seqs_per_task=to(cu_seqs_per_task),
        task_prefix_lens=to(np.asarray(group_prefix, dtype=np.int32)),
        task_prefix_page_table=to(prefix_page_table[[g[0] for g in groups]]),
        max_tokens_per_task=max(task_tokens), max_query_len=int(query_lens.max()))
