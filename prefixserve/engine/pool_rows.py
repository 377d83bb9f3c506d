"""Row ids for the adapter pools (LoRA, vectors, bottlenecks): row 0 is shared (zeros or the
identity) and never handed out; the lowest free rows go first, so a pool's storage, which grows by
doubling as higher rows are used, stays as small as what is resident."""

from __future__ import annotations

from prefixserve.errors import EngineOverloadedError

SHARED_ROW = 0


class PoolRowsExhausted(EngineOverloadedError):
    """Too few free rows in a row pool ("lora" or "bottleneck") for an adapter now: every row is held
    by adapters in use. The adapter manager drains the least-used holders if it waits too long."""

    def __init__(self, message: str, pool: str, rows_needed: int):
        super().__init__(message)
        self.pool, self.rows_needed = pool, rows_needed


class RowFreeList:
    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._free = list(range(max_rows, SHARED_ROW, -1))  # pop() gives the lowest

    def __len__(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """count rows, lowest first (the caller checked there are that many)."""
        return [self._free.pop() for _ in range(count)]

    def give(self, rows) -> None:
        self._free.extend(rows)
        self._free.sort(reverse=True)


def grown_capacity(capacity: int, highest_row: int, max_rows: int) -> int:
    """Storage rows (besides the shared one) once highest_row must fit: doubled until it does."""
    while capacity < highest_row:
        capacity = min(2 * capacity, max_rows)
    return capacity
