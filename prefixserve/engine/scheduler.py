"""Continuous batching: which requests run this step and how many tokens each computes.

Each step spends a token budget: running requests first (decode, or the next chunk of a long
prefill), then waiting requests. With `max_prefill_tokens_with_decodes` set, prompt tokens in a step
where some request decodes are capped, so one new prompt does not stall every stream's next token.
When the KV pool is exhausted the most recently admitted running request is preempted: its pages
are freed and it is recomputed later (its sampled tokens are kept, so the result is unchanged).

Tenants share the engine by weight (virtual token counters, as in VTC fair scheduling): every
token a request computes adds 1/weight to its tenant's counter, and a free slot goes to the
waiting tenant with the lowest counter (FIFO within a tenant). A tenant that was idle starts at
the lowest counter of the active tenants, so idling banks no credit."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prefixserve.config import SchedulerConfig
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.request import Request, RequestStatus
from prefixserve.engine.scheduler_output import SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: KVPageManager,
                 reclaim_pages: Callable[[int], int] | None = None):
        self.config = config
        self.pages = pages
        # Frees cached-but-idle pages (task prefixes nobody uses now) before anyone is preempted.
        self.reclaim_pages = reclaim_pages
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # tenant -> tokens computed / weight, kept only while the tenant has unfinished requests
        self.virtual_tokens: dict[str, float] = {}
        self._num_unfinished: dict[str, int] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self._count(request.tenant)
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A choice forked from a running request (n > 1), its prompt already computed: it runs from
        the next step. The batch may then hold up to n - 1 more than max_num_seqs, until choices end."""
        self._count(request.tenant)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _count(self, tenant: str) -> None:
        if tenant not in self._num_unfinished:
            self.virtual_tokens[tenant] = min(self.virtual_tokens.values(), default=0.0)
            self._num_unfinished[tenant] = 0
        self._num_unfinished[tenant] += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        cap = self.config.max_prefill_tokens_with_decodes
        decoding = cap is not None and any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        prefill_budget = min(budget, cap) if decoding else budget
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            n = min(remaining, budget) if remaining == 1 else min(remaining, budget, prefill_budget)
            if n == 0:  # a prompt chunk that waits for a step with prefill budget left
                i += 1
                continue
            if not self._reserve_or_preempt(request, n, out):
                break  # the request preempted itself: nothing later in `running` remains
            self._charge(request, n, out)
            budget -= n
            if remaining > 1:
                prefill_budget -= n
            i += 1
        # Admitting new work in a step that had to preempt would only thrash the pool.
        if not out.preempted:
            self._admit(min(budget, prefill_budget), out)
        return out

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        """Fill free slots from the waiting queue, lowest virtual counter first. Requests whose
        adapter is still loading are passed over."""
        queues: dict[str, deque[Request]] = {}
        for request in self.waiting:
            if not request.adapter_pending:
                queues.setdefault(request.tenant, deque()).append(request)
        while queues and budget > 0 and len(self.running) < self.config.max_num_seqs:
            tenant = min(queues, key=self.virtual_tokens.__getitem__)
            request = queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(request, n):
                break
            self.waiting.remove(request)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._charge(request, n, out)
            budget -= n

    def _charge(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> None:
        out.requests.append(request)
        out.num_new_tokens.append(num_new_tokens)
        self.virtual_tokens[request.tenant] += num_new_tokens / request.tenant_weight

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) from the queues and free its pages."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release(request)
        request.status = status
        tenant = request.tenant
        self._num_unfinished[tenant] -= 1
        if not self._num_unfinished[tenant]:
            del self._num_unfinished[tenant], self.virtual_tokens[tenant]

    def _reserve(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.pages.pages_for(request.num_computed_tokens + num_new_tokens) - len(request.page_ids)
        if needed <= 0:
            return True
        if not self.pages.can_allocate(needed) and self.reclaim_pages is not None:
            self.reclaim_pages(needed)
        if not self.pages.can_allocate(needed):
            return False
        request.page_ids.extend(self.pages.allocate(needed))
        return True

    def _reserve_or_preempt(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> bool:
        while not self._reserve(request, num_new_tokens):
            victim = self.running.pop()
            self._release(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.WAITING
            self.waiting.appendleft(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _release(self, request: Request) -> None:
        self.pages.free(request.page_ids)
        request.page_ids = []
