"""Device memory for bottleneck adapters (kind "adapter"), laid out as the LoRA pool is: an adapter
of size r owns r row ids, the same in every placement's pool, from one free list, so sizes 1..max
coexist without padding and freeing never fragments. Per placement ("attention", "mlp") the pool
holds down [num_layers, rows, hidden], down_bias [num_layers, rows] and up [num_layers, rows, hidden]
(row j of up is column j of the adapter's up matrix), in the engine's dtype; each adapter's up bias
[hidden] sits at its own slot of up_bias [num_layers, slots, hidden]. Row and slot 0 are all zeros
and never handed out (kernels/bottleneck.py pads with row 0).

Storage grows by doubling between steps and a placement's pool exists once an adapter uses it, so a
deployment pays for what is resident; `max_rows` is the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.engine.pool_rows import PoolRowsExhausted, RowFreeList, grown_capacity
from prefixserve.errors import ConfigError
from prefixserve.models.llama import LlamaArch

INITIAL_ROWS = 64  # row storage before the first growth (plus the zero row)
INITIAL_SLOTS = 16
DEFAULT_BUDGET_SIZE = 16  # the default bound holds max_num_seqs adapters of this size
PLACEMENT_TENSORS = ("down", "down_bias", "up", "up_bias")


def bytes_per_row(arch: LlamaArch, dtype: torch.dtype) -> int:
    """Bytes of one bottleneck unit over every layer and both placements (down row, its bias, up row)."""
    return arch.num_layers * 2 * (2 * arch.hidden_size + 1) * dtype.itemsize


def pool_rows_for(max_num_seqs: int, max_size: int) -> int:
    """The bound: max_num_seqs adapters of DEFAULT_BUDGET_SIZE, and at least one of the largest size
    an upload may have (else one would be accepted and then wait forever)."""
    rows = max(max_num_seqs * DEFAULT_BUDGET_SIZE, max_size)
    if rows < 1:
        raise ConfigError(f"the bottleneck pool needs at least one row, found {rows}")
    return rows


@dataclass(frozen=True)
class BottleneckAllocation:
    """Where one resident adapter lives in the pool."""

    rows: tuple[int, ...]  # one per bottleneck unit
    slot: int  # its up bias
    activation: str

    @property
    def size(self) -> int:
        return len(self.rows)


class BottleneckPool:
    def __init__(self, arch: LlamaArch, max_rows: int, dtype: torch.dtype, device: torch.device):
        self.arch, self.max_rows, self.dtype, self.device = arch, max_rows, dtype, device
        self.capacity = min(INITIAL_ROWS, max_rows)  # row storage, excluding row 0
        self.slot_capacity = min(INITIAL_SLOTS, max_rows)
        # placement -> {"down": [L, 1 + capacity, hidden], "down_bias": [L, 1 + capacity],
        #               "up": [L, 1 + capacity, hidden], "up_bias": [L, 1 + slot_capacity, hidden]}
        self.pools: dict[str, dict[str, torch.Tensor]] = {}
        self._rows = RowFreeList(max_rows)
        self._slots = RowFreeList(max_rows)  # every adapter has a row, so slots run out no sooner

    @property
    def num_free_rows(self) -> int:
        return len(self._rows)

    @property
    def bytes_allocated(self) -> int:
        return sum(t.nbytes for pool in self.pools.values() for t in pool.values())

    def load(self, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], activation: str,
             size: int) -> BottleneckAllocation:
        """weights: (layer, placement) -> (down [size, hidden], down_bias [size], up [hidden, size],
        up_bias [hidden]) of one adapter."""
        if size > len(self._rows):
            raise PoolRowsExhausted(f"the bottleneck pool has {len(self._rows)} free rows of {self.max_rows}, the "
                                    f"adapter needs {size}; retry when running requests end", "bottleneck", size)
        rows, [slot] = self._rows.take(size), self._slots.take(1)
        try:
            self._grow(max(rows), slot)
            for _, placement in weights:
                self._pool(placement)
            index = torch.tensor(rows, device=self.device)
            for pool in self.pools.values():  # reused rows may hold an old adapter's; a placement it lacks is 0
                for name in ("down", "down_bias", "up"):
                    pool[name][:, index] = 0
                pool["up_bias"][:, slot] = 0
            for (layer, placement), (down, down_bias, up, up_bias) in weights.items():
                pool = self.pools[placement]
                pool["down"][layer, index] = down.to(self.device, self.dtype)
                pool["down_bias"][layer, index] = down_bias.to(self.device, self.dtype)
                pool["up"][layer, index] = up.T.to(self.device, self.dtype)
                pool["up_bias"][layer, slot] = up_bias.to(self.device, self.dtype)
        except BaseException:
            self._rows.give(rows)
            self._slots.give([slot])
            raise
        return BottleneckAllocation(tuple(rows), slot, activation)

    def free(self, allocation: BottleneckAllocation) -> None:
        self._rows.give(allocation.rows)
        self._slots.give([allocation.slot])

    def _pool(self, placement: str) -> dict[str, torch.Tensor]:
        if placement not in self.pools:
            layers, hidden = self.arch.num_layers, self.arch.hidden_size
            rows, slots = 1 + self.capacity, 1 + self.slot_capacity
            shapes = {"down": (layers, rows, hidden), "down_bias": (layers, rows), "up": (layers, rows, hidden),
                      "up_bias": (layers, slots, hidden)}
            self.pools[placement] = {name: torch.zeros(shape, dtype=self.dtype, device=self.device)
                                     for name, shape in shapes.items()}
        return self.pools[placement]

    def _grow(self, highest_row: int, slot: int) -> None:
        """Double row or slot storage until they hold highest_row and slot (engine thread, between steps)."""
        capacity = grown_capacity(self.capacity, highest_row, self.max_rows)
        slot_capacity = grown_capacity(self.slot_capacity, slot, self.max_rows)
        if (capacity, slot_capacity) == (self.capacity, self.slot_capacity):
            return
        for pool in self.pools.values():
            for name, tensor in pool.items():
                wanted = 1 + (slot_capacity if name == "up_bias" else capacity)
                if tensor.shape[1] < wanted:
                    new = tensor.new_zeros((tensor.shape[0], wanted, *tensor.shape[2:]))
                    new[:, :tensor.shape[1]] = tensor
                    pool[name] = new
        self.capacity, self.slot_capacity = capacity, slot_capacity
