"""The CPU path of the batched LoRA: a fixed number of torch ops per projection, however many
distinct adapters the step holds.

Segments (the tokens of one adapter) are planned once per step:
- small ones (decode rows, short chunks) go into one grouped bmm per rank bucket: their A and B rows
  are gathered from the pool into [g, R, in] / [g, R, out] and their tokens into [g, T, in], padded
  to the bucket's rank R and the group's longest segment T;
- long ones (prefill chunks, few per step under the token budget) run alone at their real rank,
  where two matmuls already amortise over many tokens and padding them would cost more.
Rank buckets are powers of two from 8, so a rank-8 adapter beside a rank-64 one is not padded 8x.
With a stage (kernels/lora_stage.py, `plan_staged_groups`), a group's A and B rows are not gathered but
kept across steps in slots, and the bmm reads them in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixserve.kernels.lora_meta import ZERO_ROW, LoRABatchMetadata
from prefixserve.kernels.lora_stage import LoRAStage

MAX_GROUPED_TOKENS = 16  # a segment longer than this runs alone
MIN_RANK_BUCKET = 8


MAX_RUNS = 4  # targets in more runs of consecutive rows than this are scattered by index


@dataclass
class _Scatter:
    """Where the rows of a delta land in y, planned once per step. Targets in a few runs of
    consecutive rows (a prefill chunk, the decode rows of a batch, two chunks of one task) take a
    slice add per run; others a gather, add and index_copy_ (the targets are distinct). Not
    index_add_: on CPU it took ~390 us into a 512-row y whatever the number of rows added, against
    ~25-65 us for these, and LoRA's index_add_ calls were ~8 % of a many-task workload in-process."""

    order: torch.Tensor | None  # [n] int64: delta rows in ascending target order; None: every row, in order
    targets: torch.Tensor  # [n] int64: ascending, distinct token rows of y
    runs: list[tuple[int, int, int]] | None  # (first row of y, end, first row of the ordered delta)

    @classmethod
    def of(cls, targets: torch.Tensor, delta_rows: torch.Tensor | None) -> _Scatter:
        """targets[i]: the token row of delta row delta_rows[i] (of row i when delta_rows is None)."""
        ascending, perm = torch.sort(targets)
        in_order = delta_rows is None and bool(torch.equal(perm, torch.arange(len(perm))))
        order = None if in_order else perm if delta_rows is None else delta_rows[perm]
        breaks = ((ascending[1:] - ascending[:-1]) != 1).nonzero().flatten().add(1).tolist()
        runs = None
        if len(breaks) < MAX_RUNS and len(ascending):
            starts = [0, *breaks]
            ends = [*breaks, len(ascending)]
            runs = [(int(ascending[a]), int(ascending[a]) + b - a, a) for a, b in zip(starts, ends)]
        return cls(order, ascending, runs)

    @property
    def span(self) -> tuple[int, int] | None:
        """(first, end) when the targets are exactly the rows first..end-1."""
        return self.runs[0][:2] if self.runs is not None and len(self.runs) == 1 else None

    def add(self, y: torch.Tensor, delta: torch.Tensor) -> None:
        """y[targets] += the delta's rows (already in y's dtype)."""
        if self.order is not None:
            delta = delta.index_select(0, self.order)
        if self.runs is not None:
            for first, end, offset in self.runs:
                y[first:end].add_(delta[offset:offset + end - first])
        else:
            y.index_copy_(0, self.targets, y.index_select(0, self.targets).add_(delta))


@dataclass
class _Group:
    rows: torch.Tensor  # [g * R] int64: pool rows, ZERO_ROW past each adapter's rank
    tokens: torch.Tensor  # [g * T] int64: token rows of x, padding repeats a valid row
    valid: torch.Tensor | None  # [g * T] bool, None when no token is padding
    targets: torch.Tensor  # [num_valid] int64: token rows of y for the valid entries
    scaling: torch.Tensor  # [g, 1, 1] fp32
    shape: tuple[int, int, int]  # g, T, R
    segments: list[int]  # [g] the segment of each adapter in the group
    scatter: _Scatter  # the valid rows of the [g * T, out] delta into y
    key: object = None  # what its segments share besides the rank bucket (plan_groups' segment_keys)
    staged: bool = False  # adapter i of the group sits in slot i of the stage's bucket (plan_staged_groups)


@dataclass
class _Single:
    rows: torch.Tensor  # [r] int64
    tokens: torch.Tensor  # [n] int64, ascending
    scaling: float
    segment: int
    scatter: _Scatter  # a prefill chunk's tokens are a span: x and y are sliced, not gathered


@dataclass
class GroupedPlan:
    groups: list[_Group]
    singles: list[_Single]


def _bucket(rank: int) -> int:
    bucket = MIN_RANK_BUCKET
    while bucket < rank:
        bucket *= 2
    return bucket


def plan_groups(meta: LoRABatchMetadata, segment_keys: list | None = None) -> GroupedPlan:
    """Host-side grouping of the step's segments, built once and reused by every projection.
    segment_keys[s]: segments group together only with others of an equal key (a bottleneck's activation)."""
    host = _HostMeta.of(meta)
    buckets, singles = _split_segments(meta, host, segment_keys)
    groups = [_make_group(meta, host, segments, key, rank_bucket)
              for (key, rank_bucket), segments in buckets.items()]
    return GroupedPlan(groups, singles)


def plan_staged_groups(meta: LoRABatchMetadata, stage: LoRAStage,
                       pools: dict[str, tuple[torch.Tensor, torch.Tensor]], serials: list[int]) -> GroupedPlan:
    """plan_groups with each group put on the stage (kernels/lora_stage.py) where it fits: such a
    group is laid out in slot order and marked staged, so its A and B are views, not gathers.
    serials[s]: segment s's allocation serial; pools: the LoRA pool's per-target tensors."""
    host = _HostMeta.of(meta)
    buckets, singles = _split_segments(meta, host, None)
    groups = []
    for (key, rank_bucket), segments in buckets.items():
        rows = [host.rows_table[s, :meta.host_ranks[s]] for s in segments]
        slots = stage.place(pools, rank_bucket, [serials[s] for s in segments], rows)
        if slots is not None:
            segments = [s for _, s in sorted(zip(slots, segments))]
        groups.append(_make_group(meta, host, segments, key, rank_bucket, staged=slots is not None))
    return GroupedPlan(groups, singles)


def _split_segments(meta: LoRABatchMetadata, host: _HostMeta, segment_keys: list | None
                    ) -> tuple[dict[tuple, list[int]], list[_Single]]:
    """Short segments by (key, rank bucket), and the long ones as singles."""
    buckets: dict[tuple, list[int]] = {}  # (key, rank bucket) -> segments
    singles = []
    for s, (count, rank) in enumerate(zip(meta.host_counts, meta.host_ranks)):
        if count == 0 or rank == 0:
            continue
        if count > MAX_GROUPED_TOKENS:
            tokens = host.token_indices[host.starts[s]:host.starts[s] + count]
            singles.append(_Single(host.rows_table[s, :rank].clone(), tokens, host.scaling[s], s,
                                   _Scatter.of(tokens, None)))
        else:
            key = segment_keys[s] if segment_keys is not None else None
            buckets.setdefault((key, _bucket(rank)), []).append(s)
    return buckets, singles


@dataclass
class _HostMeta:
    token_indices: torch.Tensor  # [num_lora_tokens] int64
    starts: list[int]
    rows_table: torch.Tensor  # [S, max_rank] int64
    scaling: list[float]

    @classmethod
    def of(cls, meta: LoRABatchMetadata) -> _HostMeta:
        return cls(meta.token_indices.cpu().long(), meta.segment_start_offsets.cpu().tolist(),
                   meta.segment_rows.cpu().long(), meta.segment_scaling.cpu().tolist())


def _make_group(meta: LoRABatchMetadata, host: _HostMeta, segments: list[int], key, rank_bucket: int,
                staged: bool = False) -> _Group:
    g, longest = len(segments), max(meta.host_counts[s] for s in segments)
    rows = torch.full((g, rank_bucket), ZERO_ROW, dtype=torch.long)
    tokens = torch.empty(g, longest, dtype=torch.long)
    valid = torch.zeros(g, longest, dtype=torch.bool)
    for i, s in enumerate(segments):
        rank, count = meta.host_ranks[s], meta.host_counts[s]
        rows[i, :rank] = host.rows_table[s, :rank]
        seg_tokens = host.token_indices[host.starts[s]:host.starts[s] + count]
        tokens[i, :count] = seg_tokens
        tokens[i, count:] = seg_tokens[0]  # any valid row: its padded result is dropped
        valid[i, :count] = True
    flat_valid, flat_tokens = valid.flatten(), tokens.flatten()
    all_valid = bool(flat_valid.all())
    targets = flat_tokens if all_valid else flat_tokens[flat_valid]
    scatter = _Scatter.of(targets, None if all_valid else flat_valid.nonzero().flatten())
    return _Group(rows.flatten(), flat_tokens, None if all_valid else flat_valid, targets,
                  torch.tensor([host.scaling[s] for s in segments], dtype=torch.float32).view(g, 1, 1),
                  (g, longest, rank_bucket), segments, scatter, key, staged)


def add_lora_grouped(
    x: torch.Tensor,  # [num_tokens, in_features]: the projection's input
    y: torch.Tensor,  # [num_tokens, out_features]: the base projection's output, updated in place
    lora_a: torch.Tensor,  # [pool_rows, in_features]
    lora_b: torch.Tensor,  # [pool_rows, out_features]: row j is column j of PEFT's B
    meta: LoRABatchMetadata,
    plan: GroupedPlan | None = None,  # from plan_groups(meta); built here when absent
    staged: Callable[[int, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> None:
    """y += scaling * (x @ A^T) @ B^T per token by its segment, accumulated in fp32.
    staged(R, g): this projection's stage slots 0..g-1 of bucket R, for the plan's staged groups."""
    plan = plan if plan is not None else plan_groups(meta)
    in_features, out_features = x.shape[1], y.shape[1]
    for group in plan.groups:
        g, longest, rank = group.shape
        views = staged(rank, g) if group.staged and staged is not None else None
        if views is not None:  # [g, R, in], [g, R, out]: the stage keeps them in this order
            a, b = views[0].float(), views[1].float()
        else:
            a = lora_a.index_select(0, group.rows).view(g, rank, in_features).float()  # [g, R, in]
            b = lora_b.index_select(0, group.rows).view(g, rank, out_features).float()  # [g, R, out]
        xs = x.index_select(0, group.tokens).view(g, longest, in_features).float()  # [g, T, in]
        h = torch.bmm(xs, a.transpose(1, 2)).mul_(group.scaling)  # [g, T, R]
        delta = torch.bmm(h, b).view(g * longest, out_features)  # [g*T, out]
        group.scatter.add(y, delta.to(y.dtype))
    for single in plan.singles:
        a = lora_a.index_select(0, single.rows).float()  # [r, in]
        b = lora_b.index_select(0, single.rows).float()  # [r, out]
        span = single.scatter.span
        xs = x[span[0]:span[1]] if span is not None else x.index_select(0, single.tokens)  # [n, in]
        h = torch.mm(xs.float(), a.T).mul_(single.scaling)  # [n, r]
        single.scatter.add(y, torch.mm(h, b).to(y.dtype))
