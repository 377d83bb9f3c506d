"""Per-tenant limits: requests/min, tokens/min and concurrent requests (token buckets metered per
replica), and the tasks and bytes a tenant may keep in the store. Over a limit -> 429 with a
Retry-After that says when the limit will allow the request. Everything here runs on the event
loop thread, so it needs no locks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from prefixserve.adapters_store.store import AdapterStore
from prefixserve.engine.request import RequestOutput
from prefixserve.errors import RateLimitedError
from prefixserve.server.auth import Caller
from prefixserve.server.tenants import TenantLimits

_STORE_LIMIT_RETRY_S = 60.0  # a full task quota frees up only when the tenant deletes a task


@dataclass
class TokenBucket:
    """`capacity` per minute, refilled continuously; `level` may go negative (tokens are charged as
    they are generated), and then nothing more is admitted until it is back above zero."""

    capacity: float
    level: float
    updated: float

    @property
    def rate_per_s(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now
        return self.level

    def wait_s(self, needed: float) -> float:
        """Seconds until the level reaches `needed` (after a refill)."""
        return max(0.0, (needed - self.level) / self.rate_per_s)


class _TenantMeter:
    def __init__(self, limits: TenantLimits, now: float):
        self.limits = limits
        self.requests = TokenBucket(limits.requests_per_min, limits.requests_per_min, now) \
            if limits.requests_per_min else None
        self.tokens = TokenBucket(limits.tokens_per_min, limits.tokens_per_min, now) \
            if limits.tokens_per_min else None
        self.concurrent = 0


class QuotaManager:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._meters: dict[str, _TenantMeter] = {}  # one per tenant with limits (tenants are bounded)

    async def guard(self, caller: Caller, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Admit the request on first iteration (RateLimitedError if over a limit), then charge its
        prompt and generated tokens as they stream. Closing this closes `outputs`."""
        meter = self._admit(caller)
        try:
            charged_prompt = False
            async for out in outputs:
                if meter is not None and meter.tokens is not None:
                    meter.tokens.refill(self.clock())
                    meter.tokens.level -= len(out.new_token_ids) + (0 if charged_prompt else out.num_prompt_tokens)
                    charged_prompt = True
                yield out
        finally:
            if meter is not None:
                meter.concurrent -= 1
            await outputs.aclose()

    def _admit(self, caller: Caller) -> _TenantMeter | None:
        limits = caller.limits
        if limits.requests_per_min is None and limits.tokens_per_min is None and limits.max_concurrent is None:
            self._meters.pop(caller.tenant, None)
            return None
        now = self.clock()
        meter = self._meters.get(caller.tenant)
        if meter is None or meter.limits != limits:  # new tenant, or the admin changed its limits
            meter = self._meters[caller.tenant] = _TenantMeter(limits, now)
        if limits.max_concurrent is not None and meter.concurrent >= limits.max_concurrent:
            raise RateLimitedError(f"tenant {caller.tenant!r} is at its limit of {limits.max_concurrent} concurrent "
                                   f"requests", retry_after_s=1.0)
        if meter.requests is not None and meter.requests.refill(now) < 1.0:
            raise RateLimitedError(f"tenant {caller.tenant!r} is over its limit of {limits.requests_per_min} "
                                   f"requests per minute", retry_after_s=meter.requests.wait_s(1.0))
        if meter.tokens is not None and meter.tokens.refill(now) <= 0.0:
            raise RateLimitedError(f"tenant {caller.tenant!r} is over its limit of {limits.tokens_per_min} tokens "
                                   f"per minute", retry_after_s=max(1.0, meter.tokens.wait_s(1.0)))
        if meter.requests is not None:
            meter.requests.level -= 1.0
        meter.concurrent += 1
        return meter


def check_store_quota(caller: Caller, store: AdapterStore, engine_task: str, new_bytes: int) -> None:
    """Refuse an upload that would take the tenant past max_tasks or max_task_bytes (blocking store
    reads: run it off the event loop). Replacing a task counts its new size instead of its old one."""
    limits = caller.limits
    if limits.max_tasks is None and limits.max_task_bytes is None:
        return
    current = store.list_tasks(f"{caller.tenant}/")
    _check_task_count(caller, set(current), engine_task, "tasks")
    if limits.max_task_bytes is not None:
        used = sum(h[0].num_bytes for t in current if t != engine_task and (h := store.history(t)))
        if used + new_bytes > limits.max_task_bytes:
            raise RateLimitedError(f"tenant {caller.tenant!r} would keep {used + new_bytes} bytes of tasks, its limit "
                                   f"is {limits.max_task_bytes}", retry_after_s=_STORE_LIMIT_RETRY_S)


def check_job_task_quota(caller: Caller, store: AdapterStore, engine_task: str, queued_tasks: set[str]) -> None:
    """Refuse a training job that would create a task past max_tasks: the tenant's tasks are those in
    the store and those its unfinished jobs will publish (blocking store read: run it off the event loop)."""
    if caller.limits.max_tasks is None:
        return
    _check_task_count(caller, set(store.list_tasks(f"{caller.tenant}/")) | queued_tasks, engine_task,
                      "tasks, counting those its unfinished training jobs will publish")


def _check_task_count(caller: Caller, tasks: set[str], engine_task: str, counted: str) -> None:
    limit = caller.limits.max_tasks
    if limit is not None and engine_task not in tasks and len(tasks) >= limit:
        raise RateLimitedError(f"tenant {caller.tenant!r} has {len(tasks)} {counted}; its limit is {limit}: "
                               f"delete one first", retry_after_s=_STORE_LIMIT_RETRY_S)
