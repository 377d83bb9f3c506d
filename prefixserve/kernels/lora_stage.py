"""Persistent, bmm-ready copies of the adapters that decode step after step (the CPU LoRA path).

The grouped CPU path (lora_grouped.py) gathers every short segment's A and B rows from the pool into
[g, R, features] tensors, per projection and layer, every step: with 64 distinct rank-8 adapters on
q/k/v/o of SmolLM2 fp32 that copies ~240 MB per decode step, about a third of what the step adds over
the plain backbone. A decode batch changes by a few sequences a step, so the stage keeps each
adapter's rows, padded with zeros to its rank bucket R, in one slot of per-target tensors
[num_layers, slots, R, features], vLLM v1's persistent batch applied to the weights: a step copies in
only the adapters new to it, moves the last slots' adapters into the holes that leaving ones left, and
hands the bmm slots [0, g) of the group, a view. Slot contents are keyed by allocation serial, never
by pool rows, so a row freed and reused by another adapter can never serve stale weights.

Bounded in bytes (the caller passes the LoRA pool's budget); a group that does not fit is gathered
as before. Slot storage grows by doubling, and is rebuilt from scratch when the pool gains a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

INITIAL_SLOTS = 8


@dataclass
class _Bucket:
    """Slots of one rank bucket: per target a [num_layers, slots, R, in] and b [num_layers, slots, R, out]."""

    rank: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keys: list[int | None] = field(default_factory=list)  # the allocation serial in each slot

    @property
    def num_slots(self) -> int:
        return len(self.keys)


class LoRAStage:
    """Owned by the model runner next to its LoRA pool; used between steps on the engine thread only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._buckets: dict[int, _Bucket] = {}
        self._targets: frozenset[str] = frozenset()

    @property
    def bytes_allocated(self) -> int:
        return sum(a.nbytes + b.nbytes for bucket in self._buckets.values() for a, b in bucket.tensors.values())

    def place(self, pools: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, keys: list[int],
              rows: list[torch.Tensor]) -> list[int] | None:
        """Put a group's adapters in slots 0..g-1 of bucket `rank` and return each one's slot (a
        permutation of 0..g-1: the caller orders the group by it). keys[i]: adapter i's allocation
        serial, distinct; rows[i]: its pool rows [r_i] int64, r_i <= rank. pools: the LoRA pool's
        per-target (a [L, rows, in], b [L, rows, out]). None, changing nothing, when the group does
        not fit the byte budget: the caller gathers it instead."""
        if frozenset(pools) != self._targets:  # a new target: every staged adapter lacks its rows
            self._buckets.clear()
            self._targets = frozenset(pools)
        bucket = self._buckets.get(rank)
        if bucket is None or bucket.num_slots < len(keys):
            if not self._grow(pools, rank, len(keys)):
                return None
            bucket = self._buckets[rank]
        g, wanted = len(keys), set(keys)
        where = {key: slot for slot, key in enumerate(bucket.keys) if key in wanted}
        holes = [slot for slot in range(g) if bucket.keys[slot] not in wanted]  # empty, or a leaver's
        for key, slot in where.items():  # wanted adapters past slot g move down into holes
            if slot >= g:
                where[key] = holes.pop()
                self._move(bucket, slot, where[key])
        for key, adapter_rows in zip(keys, rows):  # adapters new to the stage take the remaining holes
            if key not in where:
                where[key] = holes.pop()
                self._copy_in(bucket, pools, where[key], key, adapter_rows)
        return [where[key] for key in keys]

    def views(self, target: str, layer: int, rank: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a [count, R, in], b [count, R, out]): slots 0..count-1 of a bucket for one projection."""
        bucket = self._buckets.get(rank)
        if bucket is None or target not in bucket.tensors:
            return None
        a, b = bucket.tensors[target]
        return a[layer, :count], b[layer, :count]

    def _grow(self, pools, rank: int, needed: int) -> bool:
        old = self._buckets.get(rank)
        slots = max(INITIAL_SLOTS, old.num_slots if old is not None else 0)
        while slots < needed:
            slots *= 2
        per_slot = sum(rank * a.shape[0] * (a.shape[2] + b.shape[2]) * a.element_size() for a, b in pools.values())
        others = self.bytes_allocated - (sum(a.nbytes + b.nbytes for a, b in old.tensors.values()) if old else 0)
        if others + slots * per_slot > self.max_bytes:
            slots = needed  # no doubling slack near the budget
            if others + slots * per_slot > self.max_bytes:
                return False
        bucket = _Bucket(rank, keys=[None] * slots)
        for target, (pool_a, pool_b) in pools.items():
            shape = (pool_a.shape[0], slots, rank)
            a = torch.zeros(*shape, pool_a.shape[2], dtype=pool_a.dtype, device=pool_a.device)
            b = torch.zeros(*shape, pool_b.shape[2], dtype=pool_b.dtype, device=pool_b.device)
            if old is not None:
                a[:, :old.num_slots] = old.tensors[target][0]
                b[:, :old.num_slots] = old.tensors[target][1]
            bucket.tensors[target] = (a, b)
        if old is not None:
            bucket.keys[:old.num_slots] = old.keys
        self._buckets[rank] = bucket
        return True

    @staticmethod
    def _copy_in(bucket: _Bucket, pools, slot: int, key: int, rows: torch.Tensor) -> None:
        rank = rows.shape[0]
        for target, (a, b) in bucket.tensors.items():
            pool_a, pool_b = pools[target]
            a[:, slot, :rank] = pool_a.index_select(1, rows)  # [L, r, in]
            b[:, slot, :rank] = pool_b.index_select(1, rows)
            a[:, slot, rank:] = 0  # padding ranks add exactly nothing
            b[:, slot, rank:] = 0
        bucket.keys[slot] = key

    @staticmethod
    def _move(bucket: _Bucket, src: int, dst: int) -> None:
        for a, b in bucket.tensors.values():
            a[:, dst] = a[:, src]
            b[:, dst] = b[:, src]
        bucket.keys[dst], bucket.keys[src] = bucket.keys[src], None
