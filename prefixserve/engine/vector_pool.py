"""Device memory for per-task vectors over projections (IA3's scales; any kind that rescales or
shifts a projection's input or output), one row per resident task.

Per (mode, target) the pool holds [num_layers, rows, features] in fp32: a task owns one row id, the
same in every pool, and a step gathers each token's row (`VectorStep` in models/llama.py), so the
cost is per token, never per task. Row 0 is the identity (scales 1, shifts 0) and never handed
out: tokens of other tasks, and layers or targets a task leaves alone, read it, and x * 1 + 0 is x
exactly. fp32 because peft keeps these vectors in fp32 and multiplies in it, whatever the backbone's
dtype. A pool exists once a task uses its (mode, target) and grows by doubling between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.adapters_store.kinds import lora_features
from prefixserve.engine.pool_rows import SHARED_ROW, RowFreeList, grown_capacity
from prefixserve.errors import EngineOverloadedError
from prefixserve.models.llama import LlamaArch

IDENTITY_ROW = SHARED_ROW
INITIAL_ROWS = 16  # storage before the first growth (plus the identity row)
VECTOR_MODES = {"scale_in": (0, 1.0), "scale_out": (1, 1.0), "shift_out": (1, 0.0)}  # mode -> (features side, identity)


@dataclass(frozen=True)
class VectorAllocation:
    """Where one resident task's vectors live."""

    row: int


class VectorPool:
    def __init__(self, arch: LlamaArch, max_rows: int, device: torch.device):
        self.arch, self.max_rows, self.device = arch, max_rows, device
        self.capacity = min(INITIAL_ROWS, max_rows)
        self.pools: dict[tuple[str, str], torch.Tensor] = {}  # (mode, target) -> [num_layers, 1 + capacity, features]
        self._free = RowFreeList(max_rows)

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    @property
    def bytes_allocated(self) -> int:
        return sum(pool.nbytes for pool in self.pools.values())

    def load(self, vectors: dict[tuple[int, str, str], torch.Tensor]) -> VectorAllocation:
        """vectors: (layer, target, mode) -> [features] of one task."""
        if not self._free:
            # The pool has a row for every running sequence twice over, so one frees as requests end; not
            # PoolRowsExhausted, which would drain LoRAs or bottlenecks for rows they do not hold.
            raise EngineOverloadedError(f"the vector pool's {self.max_rows} rows are all held by tasks in use; "
                                        f"retry when running requests end")
        [row] = self._free.take(1)
        try:
            self._grow(row)
            for _, target, mode in vectors:
                self._pool(mode, target)
            for (mode, _), pool in self.pools.items():  # a reused row may hold an old task's values
                pool[:, row] = VECTOR_MODES[mode][1]
            for (layer, target, mode), vector in vectors.items():
                self.pools[(mode, target)][layer, row] = vector.to(self.device, torch.float32)
        except BaseException:
            self._free.give([row])
            raise
        return VectorAllocation(row)

    def free(self, allocation: VectorAllocation) -> None:
        self._free.give([allocation.row])

    def _pool(self, mode: str, target: str) -> torch.Tensor:
        if (mode, target) not in self.pools:
            side, identity = VECTOR_MODES[mode]
            features = lora_features(self.arch)[target][side]
            self.pools[(mode, target)] = torch.full((self.arch.num_layers, 1 + self.capacity, features), identity,
                                                    dtype=torch.float32, device=self.device)
        return self.pools[(mode, target)]

    def _grow(self, highest_row: int) -> None:
        if highest_row <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, highest_row, self.max_rows)
        for (mode, target), pool in list(self.pools.items()):
            new = torch.full((pool.shape[0], 1 + capacity, pool.shape[2]), VECTOR_MODES[mode][1],
                             dtype=torch.float32, device=self.device)
            new[:, :pool.shape[1]] = pool
            self.pools[(mode, target)] = new
        self.capacity = capacity
