"""Decoded adapter artifacts in host memory: an LRU bounded in bytes. The tier between the store
(bytes, maybe remote) and the device (compiled prefixes, LoRA pool rows). Engine thread only."""

from __future__ import annotations

from collections import OrderedDict

from prefixserve.adapters_store.artifact import Artifact


class HostCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, Artifact] = OrderedDict()  # version -> artifact, oldest first
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, version: str) -> bool:
        return version in self._entries

    def get(self, version: str) -> Artifact | None:
        artifact = self._entries.get(version)
        if artifact is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(version)
        return artifact

    def put(self, artifact: Artifact) -> None:
        """Keep the artifact, dropping least recently used ones past the budget. One larger than the
        whole budget is not kept (the caller still holds it for the compile in progress)."""
        if artifact.version in self._entries or artifact.num_bytes > self.max_bytes:
            return
        self._entries[artifact.version] = artifact
        self.num_bytes += artifact.num_bytes
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
            self.evictions += 1
