"""Per-tenant limits: requests/min, tokens/min and concurrent requests (token buckets and a count of
requests in flight), and the tasks and bytes a tenant may keep in the store. Over a limit -> 429 with a
Retry-After that says when the limit will allow the request.

Rates are metered by a `TenantMeter`: `InMemoryTenantMeter` (the default) meters what this process
serves, so N replicas give a tenant N times its limits; `redis_quotas.RedisTenantMeter` meters in
Redis, shared by every replica. `QuotaManager.guard` is the one place a request is admitted and its
tokens are charged, whichever meter it uses."""

from __future__ import annotations

import abc
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from prefixserve.adapters_store.store import AdapterStore, VersionRecord, history_after, retained_versions
from prefixserve.engine.request import RequestOutput
from prefixserve.errors import RateLimitedError, StoreUnavailableError
from prefixserve.server.auth import Caller
from prefixserve.server.tenants import TenantLimits

logger = logging.getLogger(__name__)

_STORE_LIMIT_RETRY_S = 60.0  # a full task quota frees up only when the tenant deletes a task
CONCURRENCY_RETRY_S = 1.0  # a concurrency slot frees up when any of the tenant's requests ends


def over_concurrency(tenant: str, limits: TenantLimits) -> RateLimitedError:
    return RateLimitedError(f"tenant {tenant!r} is at its limit of {limits.max_concurrent} concurrent requests",
                            retry_after_s=CONCURRENCY_RETRY_S)


def over_requests(tenant: str, limits: TenantLimits, retry_after_s: float) -> RateLimitedError:
    return RateLimitedError(f"tenant {tenant!r} is over its limit of {limits.requests_per_min} requests per minute",
                            retry_after_s=retry_after_s)


def over_tokens(tenant: str, limits: TenantLimits, retry_after_s: float) -> RateLimitedError:
    return RateLimitedError(f"tenant {tenant!r} is over its limit of {limits.tokens_per_min} tokens per minute",
                            retry_after_s=max(1.0, retry_after_s))


class TenantMeter(abc.ABC):
    """Where a tenant's request rate, token rate and requests in flight are counted. Every method takes
    the limits the request was admitted under; a bucket whose limit changed starts full."""

    # How long QuotaManager may hold a request's streamed tokens before charging them: 0 charges every
    # engine output; a meter with a round trip per charge sets more.
    charge_interval_s: float = 0.0

    @abc.abstractmethod
    async def admit(self, tenant: str, limits: TenantLimits, slot_id: str) -> None:
        """Check concurrency, then the requests bucket (>= 1 needed), then the tokens bucket (> 0 needed);
        if all pass take one request and the concurrency slot `slot_id`, else raise RateLimitedError
        having taken nothing. Shared meters raise StoreUnavailableError when they cannot be reached."""

    @abc.abstractmethod
    async def charge(self, tenant: str, limits: TenantLimits, num_tokens: int) -> None:
        """Take `num_tokens` from the tokens bucket; its level may go below zero."""

    @abc.abstractmethod
    async def release(self, tenant: str, limits: TenantLimits, slot_id: str, num_tokens: int) -> None:
        """Charge a finished request's last `num_tokens` and give its concurrency slot back."""


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


def _bucket(capacity: int | None, now: float) -> TokenBucket | None:
    return TokenBucket(capacity, capacity, now) if capacity else None


@dataclass
class _TenantState:
    limits: TenantLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    slots: set[str] = field(default_factory=set)  # ids of the tenant's requests in flight


class InMemoryTenantMeter(TenantMeter):
    """Meters in this process (one replica). Everything runs on the event loop thread, so it needs no
    locks: no method awaits anything."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._states: dict[str, _TenantState] = {}  # one per tenant ever metered (tenants are bounded)

    async def admit(self, tenant: str, limits: TenantLimits, slot_id: str) -> None:
        now = self.clock()
        state = self._state(tenant, limits, now)
        if limits.max_concurrent is not None and len(state.slots) >= limits.max_concurrent:
            raise over_concurrency(tenant, limits)
        if state.requests is not None and state.requests.refill(now) < 1.0:
            raise over_requests(tenant, limits, state.requests.wait_s(1.0))
        if state.tokens is not None and state.tokens.refill(now) <= 0.0:
            raise over_tokens(tenant, limits, state.tokens.wait_s(1.0))
        if state.requests is not None:
            state.requests.level -= 1.0
        state.slots.add(slot_id)

    async def charge(self, tenant: str, limits: TenantLimits, num_tokens: int) -> None:
        state = self._states.get(tenant)
        if state is not None and state.tokens is not None:
            state.tokens.refill(self.clock())
            state.tokens.level -= num_tokens

    async def release(self, tenant: str, limits: TenantLimits, slot_id: str, num_tokens: int) -> None:
        await self.charge(tenant, limits, num_tokens)
        state = self._states.get(tenant)
        if state is not None:
            state.slots.discard(slot_id)

    def _state(self, tenant: str, limits: TenantLimits, now: float) -> _TenantState:
        state = self._states.get(tenant)
        if state is None or state.limits != limits:  # new tenant, or the admin changed its limits
            # Fresh buckets, but the requests in flight still count against the new concurrency limit.
            state = self._states[tenant] = _TenantState(limits, _bucket(limits.requests_per_min, now),
                                                        _bucket(limits.tokens_per_min, now),
                                                        state.slots if state is not None else set())
        return state


def _is_metered(limits: TenantLimits) -> bool:
    return not (limits.requests_per_min is None and limits.tokens_per_min is None and limits.max_concurrent is None)


class QuotaManager:
    """Admits requests against their tenant's rate limits and charges their tokens, through one
    `TenantMeter` (default: in this process only)."""

    def __init__(self, meter: TenantMeter | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # paces the charges of streamed tokens
        self.meter = meter if meter is not None else InMemoryTenantMeter(clock)

    async def guard(self, caller: Caller, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Admit the request on first iteration (RateLimitedError if over a limit, StoreUnavailableError if
        a shared meter is unreachable), then charge its prompt and generated tokens as they stream, at most
        `meter.charge_interval_s` apart and the rest when it ends. Closing this closes `outputs`."""
        limits = caller.limits
        if not _is_metered(limits):
            try:
                async for out in outputs:
                    yield out
            finally:
                await outputs.aclose()
            return
        slot_id = uuid.uuid4().hex
        await self.meter.admit(caller.tenant, limits, slot_id)
        charges = _TokenCharges(self.meter, caller.tenant, limits, self.clock)
        try:
            async for out in outputs:
                await charges.add(out)
                yield out
        finally:
            try:
                await outputs.aclose()  # abort the request first, then give its slot back
            finally:
                await charges.settle(slot_id)


class _TokenCharges:
    """One admitted request's streamed tokens on their way to the meter. Once admitted, a request is
    never failed by its meter: if a charge cannot reach a shared meter, the request goes on uncharged
    (each further try could cost another timeout; new requests are refused with a 503 meanwhile), and a
    slot that cannot be given back lapses at the meter's lease."""

    def __init__(self, meter: TenantMeter, tenant: str, limits: TenantLimits, clock: Callable[[], float]):
        self.meter, self.tenant, self.limits, self.clock = meter, tenant, limits, clock
        self.pending = 0  # tokens generated (and the prompt) but not charged yet
        self._charged_prompt = False
        self._last_charge = -math.inf  # so the first output (which carries the prompt) is charged at once
        self._failed = False

    async def add(self, out: RequestOutput) -> None:
        if self.limits.tokens_per_min is None or self._failed:
            return
        self.pending += len(out.new_token_ids) + (0 if self._charged_prompt else out.num_prompt_tokens)
        self._charged_prompt = True
        now = self.clock()
        if self.pending and now - self._last_charge >= self.meter.charge_interval_s:
            self._last_charge = now
            num_tokens, self.pending = self.pending, 0
            try:
                await self.meter.charge(self.tenant, self.limits, num_tokens)
            except StoreUnavailableError as exc:
                self._failed = True
                logger.warning("tenant %r: %d tokens not charged, and this request's further tokens will not be: "
                               "%s", self.tenant, num_tokens, exc.message)

    async def settle(self, slot_id: str) -> None:
        """Charge what is pending and give the concurrency slot back."""
        try:
            await self.meter.release(self.tenant, self.limits, slot_id, 0 if self._failed else self.pending)
            self.pending = 0
        except StoreUnavailableError as exc:
            logger.warning("tenant %r: a finished request's slot was not given back (it lapses at its lease): %s",
                           self.tenant, exc.message)


def check_store_quota(caller: Caller, store: AdapterStore, engine_task: str, new_bytes: int,
                      new_version: str | None = None) -> None:
    """Refuse an upload that would take the tenant past max_tasks or max_task_bytes (blocking store
    reads: run it off the event loop). The bytes are what the tenant's tasks retain once the upload is
    stored: every version their histories hold, each distinct version once, the uploaded task's history
    being the new version plus its newest max_history - 1 older entries. With `new_version` (the upload's
    sha256) a version the tenant already retains adds nothing; without it the upload counts as new bytes."""
    limits = caller.limits
    if limits.max_tasks is None and limits.max_task_bytes is None:
        return
    histories = store.histories(f"{caller.tenant}/")
    _check_task_count(caller, set(histories), engine_task, "tasks")
    if limits.max_task_bytes is not None:
        used = sum(retained_versions(histories.values()).values())
        after = sum(_retained_after_upload(histories, engine_task, new_bytes, new_version,
                                           store.max_history).values())
        if after > limits.max_task_bytes:
            raise RateLimitedError(
                f"tenant {caller.tenant!r} keeps {used} bytes of task versions and this upload adds {after - used}, "
                f"past its limit of {limits.max_task_bytes} bytes; old versions count until they fall out of their "
                f"task's history (its newest {store.max_history} entries) or the task is deleted",
                retry_after_s=_STORE_LIMIT_RETRY_S)


def _retained_after_upload(histories: dict[str, list[VersionRecord]], engine_task: str, new_bytes: int,
                           new_version: str | None, max_history: int) -> dict[str, int]:
    """version -> bytes of what the tenant's tasks retain once the upload is `engine_task`'s current version."""
    history = histories.get(engine_task, [])
    if new_version is not None and history and history[0].version == new_version:
        return retained_versions(histories.values())  # already current: the put changes nothing
    # Unknown version: a name no stored version has (versions are hex digests), so it counts as new bytes.
    upload = VersionRecord(new_version or "(this upload)", kind="", num_bytes=new_bytes, created_at=0.0)
    return retained_versions({**histories, engine_task: history_after(upload, history, max_history)}.values())


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
