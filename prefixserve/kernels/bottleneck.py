"""Batched bottleneck adapters: y += up(act(y @ down^T + down_bias)) + up_bias per token, by its task,
in a fixed number of torch ops per placement however many distinct adapters the step holds.

The layout is the LoRA pool's (kernels/lora_meta.py): an adapter of size r owns r pool rows, row j of
`down` and `up` holding its j-th bottleneck unit (a row of its down matrix, a column of its up
matrix) and `down_bias` that unit's bias; its up bias sits at its own slot of a per-adapter table.
Segments are grouped as for LoRA (kernels/lora_grouped.py: padded by adapter in one bmm per rank
bucket, long prefill segments alone), and also by activation. Rows past an adapter's size point at
the zero row, whose down, bias and up are 0: every supported activation maps 0 to 0, so padding adds
exactly nothing. Accumulated in fp32 whatever the backbone's dtype. The same torch path runs on
CUDA (there is no Triton kernel for it yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefixserve.kernels.lora_grouped import GroupedPlan, plan_groups
from prefixserve.kernels.lora_meta import LoRABatchMetadata

ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}  # each maps 0 to 0


@dataclass
class BottleneckPlan:
    """A step's grouping (built once on the host, shared by every layer and placement) and, per
    group / single of it, the adapters' up-bias slots."""

    grouped: GroupedPlan
    group_slots: list[torch.Tensor]  # per group: [g] int64
    single_slots: list[int]
    single_activations: list[str]


def plan_bottleneck(meta: LoRABatchMetadata, activations: list[str], slots: list[int]) -> BottleneckPlan:
    """activations[s], slots[s]: segment s's adapter's activation and up-bias slot."""
    grouped = plan_groups(meta, segment_keys=activations)
    device = meta.token_indices.device
    group_slots = [torch.tensor([slots[s] for s in group.segments], dtype=torch.long, device=device)
                   for group in grouped.groups]
    return BottleneckPlan(grouped, group_slots, [slots[single.segment] for single in grouped.singles],
                          [activations[single.segment] for single in grouped.singles])


def add_bottleneck(
    y: torch.Tensor,  # [num_tokens, hidden]: the sublayer's output, updated in place
    down: torch.Tensor,  # [pool_rows, hidden]
    down_bias: torch.Tensor,  # [pool_rows]
    up: torch.Tensor,  # [pool_rows, hidden]: row j is column j of the adapter's up matrix
    up_bias: torch.Tensor,  # [slots, hidden]
    plan: BottleneckPlan,
) -> None:
    """y += up(act(y @ down^T + down_bias)) + up_bias on each adapter's tokens, in fp32."""
    hidden = y.shape[1]
    deltas = []  # computed from y as it came in, then added: no group reads another's result
    for group, slots in zip(plan.grouped.groups, plan.group_slots):
        g, longest, rank = group.shape
        d = down.index_select(0, group.rows).view(g, rank, hidden).float()  # [g, R, hidden]
        bd = down_bias.index_select(0, group.rows).view(g, 1, rank).float()  # [g, 1, R]
        u = up.index_select(0, group.rows).view(g, rank, hidden).float()  # [g, R, hidden]
        bu = up_bias.index_select(0, slots).view(g, 1, hidden).float()  # [g, 1, hidden]
        ys = y.index_select(0, group.tokens).view(g, longest, hidden).float()  # [g, T, hidden]
        h = ACTIVATION_FNS[group.key](torch.baddbmm(bd, ys, d.transpose(1, 2)))  # [g, T, R]
        delta = torch.baddbmm(bu, h, u).view(g * longest, hidden)  # [g*T, hidden]
        if group.valid is not None:
            delta = delta[group.valid]
        deltas.append((group.targets, delta))
    for single, slot, name in zip(plan.grouped.singles, plan.single_slots, plan.single_activations):
        rows, activation = single.rows, ACTIVATION_FNS[name]
        ys = y.index_select(0, single.tokens).float()  # [n, hidden]
        h = activation(F.linear(ys, down.index_select(0, rows).float(), down_bias.index_select(0, rows).float()))
        deltas.append((single.tokens, F.linear(h, up.index_select(0, rows).float().T, up_bias[slot].float())))
    for tokens, delta in deltas:  # the skip connection in fp32 too, as the reference adds it
        y.index_copy_(0, tokens, (y.index_select(0, tokens).float() + delta).to(y.dtype))
