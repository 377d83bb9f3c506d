"""Device memory for LoRA weights, sized by a byte budget (S-LoRA's unified paging, one rank per page).

Per target projection and layer the pool holds A rows [rows, in] and B rows [rows, out] (row j of B
is column j of PEFT's B). An adapter of rank r owns r row ids, the same ids in every target's pool,
taken from one free list: ranks 1..max coexist without padding, rows need not be contiguous, so
freeing never fragments, and a step's metadata lists each adapter's rows (`lora_meta`). Row 0 is
all zeros and never handed out.

The budget caps the rows; storage grows (doubling, between steps) as adapters arrive and a target's
pool exists only once an adapter uses it, so a deployment pays for what is resident, not the cap.
One row is charged at its cost over all seven projections: the budget is an upper bound on bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from prefixserve.adapters_store.kinds import lora_features
from prefixserve.engine.pool_rows import PoolRowsExhausted, RowFreeList, grown_capacity
from prefixserve.errors import ConfigError
from prefixserve.models.llama import LlamaArch

INITIAL_ROWS = 256  # storage before the first growth (plus the zero row)
DEFAULT_BUDGET_RANK = 16  # the default budget holds max_num_seqs adapters of this rank


def bytes_per_row(arch: LlamaArch, dtype: torch.dtype) -> int:
    """Bytes of one rank over every layer and all seven projections (A row + B row)."""
    return arch.num_layers * dtype.itemsize * sum(sum(f) for f in lora_features(arch).values())


def pool_rows_for(arch: LlamaArch, dtype: torch.dtype, budget_bytes: int, max_rank: int) -> int:
    """Rows a budget buys; it must hold at least one adapter of the largest rank an upload may have,
    or such an adapter would be accepted and then wait forever."""
    rows = budget_bytes // bytes_per_row(arch, dtype)
    if rows < max_rank:
        raise ConfigError(f"the LoRA memory budget of {budget_bytes} bytes holds {rows} ranks of this model "
                          f"({bytes_per_row(arch, dtype)} bytes each); expected at least max_lora_rank = {max_rank}")
    return rows


_serials = itertools.count()


@dataclass(frozen=True)
class LoRAAllocation:
    """Where one resident adapter lives in the pool."""

    rows: tuple[int, ...]  # pool row ids, one per rank
    scaling: float
    targets: frozenset[str]
    # Unique per load, never reused: what copies of the rows (kernels/lora_stage.py) are keyed by,
    # since freed rows go to the next adapter.
    serial: int = field(default_factory=lambda: next(_serials), compare=False)

    @property
    def rank(self) -> int:
        return len(self.rows)


class LoRAPool:
    def __init__(self, arch: LlamaArch, max_rows: int, dtype: torch.dtype, device: torch.device):
        self.arch, self.max_rows, self.dtype, self.device = arch, max_rows, dtype, device
        self.capacity = min(INITIAL_ROWS, max_rows)  # rows with storage, excluding the zero row
        # per target: a [num_layers, 1 + capacity, in], b [num_layers, 1 + capacity, out]
        self.pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = RowFreeList(max_rows)  # ZERO_ROW = 0 is never handed out

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    @property
    def bytes_allocated(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pools.values())

    def load(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float) -> LoRAAllocation:
        """weights: (layer, target) -> (A [r, in], B [out, r]), one rank r for the adapter."""
        rank = max(a.shape[0] for a, _ in weights.values())
        if rank > len(self._free):
            raise PoolRowsExhausted(f"the LoRA pool has {len(self._free)} free ranks of {self.max_rows}, the "
                                    f"adapter needs {rank}; retry when running adapters end", "lora", rank)
        rows = self._free.take(rank)
        targets = frozenset(target for _, target in weights)
        try:
            self._grow(max(rows))
            index = torch.tensor(rows, device=self.device)
            for target in targets:
                self._pool(target)
            for pool_a, pool_b in self.pools.values():
                # Rows of a target the adapter lacks are zeroed: a reused row may hold an old adapter's values.
                pool_a[:, index] = 0
                pool_b[:, index] = 0
            for (layer, target), (a, b) in weights.items():
                pool_a, pool_b = self.pools[target]
                pool_a[layer, index[:a.shape[0]]] = a.to(self.device, self.dtype)
                pool_b[layer, index[:a.shape[0]]] = b.T.to(self.device, self.dtype)
        except BaseException:
            self._free.give(rows)
            raise
        return LoRAAllocation(tuple(rows), scaling, targets)

    def free(self, allocation: LoRAAllocation) -> None:
        self._free.give(allocation.rows)

    def _pool(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        if target not in self.pools:
            fan_in, fan_out = lora_features(self.arch)[target]
            shape = (self.arch.num_layers, 1 + self.capacity)
            self.pools[target] = (torch.zeros(*shape, fan_in, dtype=self.dtype, device=self.device),
                                  torch.zeros(*shape, fan_out, dtype=self.dtype, device=self.device))
        return self.pools[target]

    def _grow(self, highest_row: int) -> None:
        """Double the storage until it holds highest_row (engine thread, between steps: a step's
        views of the old tensors are never read after this)."""
        if highest_row <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, highest_row, self.max_rows)
        for target, (pool_a, pool_b) in list(self.pools.items()):
            grown = []
            for pool in (pool_a, pool_b):
                new = torch.zeros(pool.shape[0], 1 + capacity, pool.shape[2], dtype=self.dtype, device=self.device)
                new[:, :pool.shape[1]] = pool
                grown.append(new)
            self.pools[target] = (grown[0], grown[1])
        self.capacity = capacity

