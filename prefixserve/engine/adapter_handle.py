"""A device-resident adapter version as requests hold it: plain data, so a request names its handle
without importing the residency that compiles it."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixserve.engine.bottleneck_pool import BottleneckAllocation
from prefixserve.engine.lora_pool import LoRAAllocation
from prefixserve.engine.vector_pool import VectorAllocation


@dataclass(eq=False)
class AdapterHandle:
    """One device-resident adapter version."""

    version: str
    kind: str
    prefix_pages: list[int] = field(default_factory=list)
    prefix_len: int = 0
    lora: LoRAAllocation | None = None
    vectors: VectorAllocation | None = None
    bottleneck: BottleneckAllocation | None = None
    num_users: int = 0  # requests holding it

    def pool_rows(self, pool: str) -> int:
        """Rows it holds in a row pool ("lora" or "bottleneck", as PoolRowsExhausted names them)."""
        allocation = {"lora": self.lora, "bottleneck": self.bottleneck}[pool]
        return 0 if allocation is None else len(allocation.rows)
