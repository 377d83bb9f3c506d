"""Bookkeeping for the paged KV pool: which pages are free and how many holders each page has.
Reference counts let read-only pages (a task's KV prefix) be shared by many sequences."""

from __future__ import annotations

from collections import deque


class OutOfPagesError(RuntimeError):
    """Internal: the scheduler asked for more pages than are free (it should have checked)."""


class KVPageManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._ref_counts = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` free pages, each with one holder."""
        if num_pages > len(self._free):
            raise OutOfPagesError(f"asked for {num_pages} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        for p in pages:
            self._ref_counts[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Add a holder to pages that are already allocated (read-only sharing)."""
        for p in pages:
            if self._ref_counts[p] == 0:
                raise ValueError(f"page {p} is free; only allocated pages can be shared")
            self._ref_counts[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one holder from each page; a page with no holders goes back to the pool."""
        for p in pages:
            if self._ref_counts[p] == 0:
                raise ValueError(f"page {p} is already free (double free)")
            self._ref_counts[p] -= 1
            if self._ref_counts[p] == 0:
                self._free.append(p)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]
