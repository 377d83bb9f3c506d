"""A step's batched-LoRA metadata over the row pool (S-LoRA style pages of one rank each).

Every target projection keeps one pool per layer, a [pool_rows, in_features] and b [pool_rows,
out_features] (row j of b is column j of PEFT's B), and an adapter of rank r owns r rows, the same
row ids in every target's pool, anywhere in it: no padding to a maximum rank and no contiguity, so
freeing never fragments. Row 0 is all zeros and never owned: rows past a segment's rank point at it.

A segment is the tokens of one adapter in this step; the metadata is built once per step on the
host and shared by every projection of every layer, on CUDA (Triton) and on CPU (grouped torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ZERO_ROW = 0


@dataclass
class LoRABatchMetadata:
    token_indices: torch.Tensor  # [num_lora_tokens] int32: token rows of x / y, grouped by segment
    num_tokens_per_segment: torch.Tensor  # [S] int32
    segment_start_offsets: torch.Tensor  # [S] int32: first entry of each segment in token_indices
    segment_rows: torch.Tensor  # [S, max_rank] int32: the adapter's pool rows, ZERO_ROW past its rank
    segment_ranks: torch.Tensor  # [S] int32
    segment_scaling: torch.Tensor  # [S] fp32: alpha / rank (or alpha / sqrt(rank) for rsLoRA)
    max_tokens_per_segment: int  # host-side maxima: size launch grids and padded tiles
    max_rank: int
    # Host copies for the CPU path, so grouping never reads tensors back.
    host_counts: list[int]
    host_ranks: list[int]

    @property
    def num_segments(self) -> int:
        return len(self.host_counts)


def lora_batch_metadata(token_segment: np.ndarray, segment_rows: list[list[int]], segment_scaling: list[float],
                        device: torch.device) -> LoRABatchMetadata:
    """token_segment: [num_tokens] the segment of each token, -1 for tokens without LoRA.
    segment_rows[s]: the pool rows of segment s's adapter (its rank is their count)."""
    token_segment = np.asarray(token_segment, dtype=np.int64)
    num_segments = len(segment_rows)
    if len(segment_scaling) != num_segments:
        raise ValueError(f"expected one scaling per segment ({num_segments}), found {len(segment_scaling)}")
    if token_segment.size and (token_segment.min() < -1 or token_segment.max() >= num_segments):
        raise ValueError(f"expected token segments in -1..{num_segments - 1}, found "
                         f"{token_segment.min()}..{token_segment.max()}")
    with_lora = np.flatnonzero(token_segment >= 0)
    order = with_lora[np.argsort(token_segment[with_lora], kind="stable")]
    counts = np.bincount(token_segment[with_lora], minlength=num_segments).astype(np.int64)
    starts = np.cumsum(counts) - counts
    ranks = [len(rows) for rows in segment_rows]
    max_rank = max(ranks, default=0)
    table = np.full((num_segments, max_rank), ZERO_ROW, dtype=np.int32)
    for s, rows in enumerate(segment_rows):
        if rows and min(rows) <= ZERO_ROW:  # the kernels trust row ids: a negative one would read before the pool
            raise ValueError(f"expected segment {s}'s pool rows above the shared zero row {ZERO_ROW}, "
                             f"found {min(rows)}")
        table[s, :len(rows)] = rows

    def put(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    return LoRABatchMetadata(
        token_indices=put(order, torch.int32), num_tokens_per_segment=put(counts, torch.int32),
        segment_start_offsets=put(starts, torch.int32), segment_rows=put(table, torch.int32),
        segment_ranks=put(np.asarray(ranks, dtype=np.int64), torch.int32),
        segment_scaling=put(np.asarray(segment_scaling, dtype=np.float32), torch.float32),
        max_tokens_per_segment=int(counts.max()) if num_segments else 0, max_rank=max_rank,
        host_counts=counts.tolist(), host_ranks=ranks,
    )
