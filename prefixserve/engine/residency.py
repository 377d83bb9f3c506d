"""Which adapter versions are on the device, who holds them, and what makes room. Engine thread only.

Implements the `DeviceTarget` that kinds compile through (adapters_store/kinds): a kind says what
its tensors become (a KV prefix, a soft prompt to prefill, LoRA weights, per-task vectors), this
module owns the KV pages and pool rows they take and evicts idle versions, least recently used
first, when any of them runs short. Prompt-style versions are compiled once into KV pages shared read-only by all
their requests, reference-counted: one reference for the resident copy, one per request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.engine.adapter_handle import AdapterHandle
from prefixserve.engine.bottleneck_pool import BottleneckAllocation
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.lora_pool import LoRAAllocation
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.vector_pool import VectorAllocation
from prefixserve.errors import AdapterError, EngineOverloadedError

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """What a compiled version holds on the device."""

    prefix_pages: list[int] = field(default_factory=list)  # prompt-style kinds: the shared KV prefix
    prefix_len: int = 0
    lora: LoRAAllocation | None = None  # lora: its rows in the pool
    vectors: VectorAllocation | None = None  # ia3, bitfit: its row in the vector pool
    bottleneck: BottleneckAllocation | None = None  # adapter: its rows in the bottleneck pool


class DeviceResidency:
    def __init__(self, runner: ModelRunner, pages: KVPageManager, max_model_len: int,
                 required: Callable[[str], Artifact]):
        self.runner, self.pages, self.max_model_len = runner, pages, max_model_len
        self.dtype: torch.dtype = runner.dtype
        self._required = required
        self.resident: OrderedDict[str, AdapterHandle] = OrderedDict()  # version -> handle, least recent first
        self.evictions = 0  # idle versions dropped from the device to make room
        # Between begin_batch and flush_batch: soft prompts whose prefill waits for one shared forward,
        # version -> (embeddings [P, hidden], pages). None: soft prompts are prefilled at once.
        self._pending: dict[str, tuple[torch.Tensor, list[int]]] | None = None
        self._compiling: str | None = None

    def make_resident(self, version: str, artifact: Artifact) -> AdapterHandle:
        self._compiling = version
        try:
            placement = get_kind(artifact.kind).compile(artifact, self)
        finally:
            self._compiling = None
        handle = AdapterHandle(version, artifact.kind, placement.prefix_pages, placement.prefix_len, placement.lora,
                               placement.vectors, placement.bottleneck)
        self.resident[version] = handle
        return handle

    def begin_batch(self) -> None:
        """Defer soft-prompt prefills until flush_batch: on CPU every forward streams all the weights,
        so 128 new prompt-style tasks compiled one forward each cost as much as ~128 decode steps."""
        self._pending = {}

    def flush_batch(self) -> dict[str, AdapterError]:
        """Prefill every deferred soft prompt in one forward; return the versions whose keys and values
        came out non-finite (their pages are zeroed; the caller unpins and drops them)."""
        pending, self._pending = self._pending or {}, None
        if not pending:
            return {}
        try:
            self.runner.prefill_embeddings_batch(list(pending.values()))
        except Exception as exc:  # these versions' fault or not, none of them may serve unwritten pages
            log.exception("prefilling %d soft prompts failed", len(pending))
            error = AdapterError(f"the task's virtual tokens could not be prefilled ({type(exc).__name__}: {exc})")
            failed = dict.fromkeys(pending, error)
        else:
            failed = {version: _non_finite_prefix(embeddings.shape[0]) for version, (embeddings, pages)
                      in pending.items() if not self.runner.prefix_is_finite(pages, embeddings.shape[0])}
        for version in failed:
            self.runner.clear_pages(pending[version][1])
        return failed

    def pin(self, handle: AdapterHandle) -> None:
        handle.num_users += 1
        self.pages.share(handle.prefix_pages)
        self.resident.move_to_end(handle.version)

    def unpin(self, handle: AdapterHandle) -> None:
        handle.num_users -= 1
        self.pages.free(handle.prefix_pages)

    def drop(self, handle: AdapterHandle) -> None:
        if self._pending is not None:
            self._pending.pop(handle.version, None)  # evicted before its prefill ran: its pages go back
        del self.resident[handle.version]
        self.pages.free(handle.prefix_pages)
        if handle.lora is not None:
            self.runner.lora_pool.free(handle.lora)
        if handle.vectors is not None:
            self.runner.vector_pool.free(handle.vectors)
        if handle.bottleneck is not None:
            self.runner.bottleneck_pool.free(handle.bottleneck)

    def evict_idle(self, enough: Callable[[], bool], holds: Callable[[AdapterHandle], bool] = lambda h: True) -> None:
        """Drop idle versions that `holds` what is short, least recently used first, until `enough`."""
        for handle in list(self.resident.values()):  # least recently used first
            if enough():
                return
            if not handle.num_users and holds(handle):
                self.drop(handle)
                self.evictions += 1

    def reclaim_pages(self, num_pages: int) -> int:
        """Evict idle prefixes (least recently used first) until num_pages are free; returns how many
        pages were freed. The scheduler calls this before it preempts anyone."""
        freed = 0
        for handle in [h for h in self.resident.values() if not h.num_users and h.prefix_pages]:
            if self.pages.num_free_pages >= num_pages:
                break
            freed += len(handle.prefix_pages)
            self.drop(handle)
            self.evictions += 1
        return freed

    # ---- DeviceTarget: what kinds compile through -----------------------------------------------
    def required(self, version: str) -> Artifact:
        return self._required(version)

    def install_kv_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> Placement:
        return self._install_prefix(keys.shape[1], lambda pages: self.runner.write_prefix(keys, values, pages))

    def install_soft_prompt(self, embeddings: torch.Tensor) -> Placement:
        if self._pending is not None and self._compiling is not None:
            pending, version = self._pending, self._compiling

            def defer(pages: list[int]) -> None:  # prefilled, and checked for finiteness, by flush_batch
                pending[version] = (embeddings, pages)

            return self._install_prefix(embeddings.shape[0], defer, check_finite=False)
        return self._install_prefix(embeddings.shape[0],
                                    lambda pages: self.runner.prefill_embeddings(embeddings, pages))

    def install_lora(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float,
                     rank: int) -> Placement:
        pool = self.runner.lora_pool
        if pool.num_free_rows < rank:
            self.evict_idle(lambda: pool.num_free_rows >= rank, holds=lambda h: h.lora is not None)
        return Placement(lora=pool.load(weights, scaling))

    def install_bottleneck(self, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], activation: str,
                           size: int) -> Placement:
        pool = self.runner.bottleneck_pool
        if pool.num_free_rows < size:
            self.evict_idle(lambda: pool.num_free_rows >= size, holds=lambda h: h.bottleneck is not None)
        return Placement(bottleneck=pool.load(weights, activation, size))

    def install_vectors(self, vectors: dict[tuple[int, str, str], torch.Tensor]) -> Placement:
        pool = self.runner.vector_pool
        if not pool.num_free_rows:
            self.evict_idle(lambda: pool.num_free_rows > 0, holds=lambda h: h.vectors is not None)
        return Placement(vectors=pool.load(vectors))

    def _install_prefix(self, num_tokens: int, write: Callable[[list[int]], None],
                        check_finite: bool = True) -> Placement:
        if num_tokens >= self.max_model_len:
            raise AdapterError(f"the adapter has {num_tokens} virtual tokens; the context holds {self.max_model_len}")
        num_pages = self.pages.pages_for(num_tokens)
        if not self.pages.can_allocate(num_pages):
            self.evict_idle(lambda: self.pages.can_allocate(num_pages))
        if not self.pages.can_allocate(num_pages):
            raise EngineOverloadedError(f"the KV pool has no room for a {num_tokens}-token prefix now; retry later")
        pages = self.pages.allocate(num_pages)
        try:
            write(pages)
            if check_finite and not self.runner.prefix_is_finite(pages, num_tokens):
                raise _non_finite_prefix(num_tokens)
        except Exception:
            # Zeroed before reuse: attention multiplies masked slots by 0, and NaN * 0 is NaN.
            self.runner.clear_pages(pages)
            self.pages.free(pages)
            raise
        return Placement(pages, num_tokens)


def _non_finite_prefix(num_tokens: int) -> AdapterError:
    return AdapterError(f"expected the task's {num_tokens} virtual tokens to give finite keys and values "
                        f"through the backbone, found NaN/Inf")
