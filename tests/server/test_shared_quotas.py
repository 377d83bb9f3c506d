"""Tenant rate limits shared by replicas through Redis: two QuotaManagers (or two real servers) on one
Redis draw on one budget per tenant, exactly, and a dead replica's concurrency slots come back."""

import asyncio
import time

import httpx
import pytest
import redis
from http_server import serving
from redis_server import free_port

from prefixserve.engine.request import RequestOutput
from prefixserve.errors import RateLimitedError, StoreUnavailableError
from prefixserve.server.auth import Authenticator, Caller
from prefixserve.server.quotas import QuotaManager
from prefixserve.server.redis_quotas import RedisTenantMeter
from prefixserve.server.tenants import RedisTenantRegistry, TenantLimits


@pytest.fixture
def make_meter(redis_url, redis_namespace):
    """RedisTenantMeters on the test's namespace, one per "replica", closed afterwards."""
    meters = []

    def make(**options) -> RedisTenantMeter:
        meters.append(RedisTenantMeter(redis_url, namespace=redis_namespace, **{"slot_lease_s": 60.0, **options}))
        return meters[-1]

    yield make
    for meter in meters:
        meter.close()


@pytest.fixture
def replicas(make_meter):
    return QuotaManager(make_meter()), QuotaManager(make_meter())


async def engine_outputs(num_prompt_tokens: int, new_tokens_per_output: list[int], pause_s: float = 0.0):
    """What the engine streams for one request: the prompt size on every output, then deltas."""
    for i, num_new in enumerate(new_tokens_per_output):
        if pause_s:
            await asyncio.sleep(pause_s)
        yield RequestOutput("r", [7] * num_new, "", finished=i == len(new_tokens_per_output) - 1,
                            num_prompt_tokens=num_prompt_tokens)


async def run_request(quotas: QuotaManager, caller: Caller, num_prompt_tokens: int = 3,
                      new_tokens_per_output: tuple[int, ...] = (1,), pause_s: float = 0.0) -> str | RateLimitedError:
    """"ok" once the request has streamed to its end, or the error that refused it."""
    try:
        async for _ in quotas.guard(caller, engine_outputs(num_prompt_tokens, list(new_tokens_per_output), pause_s)):
            pass
    except RateLimitedError as exc:
        return exc
    return "ok"


async def open_request(quotas: QuotaManager, caller: Caller, num_prompt_tokens: int = 3):
    """A request admitted and streaming (its first output read); aclose() ends it."""
    guarded = quotas.guard(caller, engine_outputs(num_prompt_tokens, [1] * 100))
    await anext(guarded)
    return guarded


def test_two_replicas_share_one_requests_per_minute_budget_exactly(replicas):
    caller = Caller("acme", limits=TenantLimits(requests_per_min=5))

    async def alternate():
        return [await run_request(replicas[i % 2], caller) for i in range(7)]

    results = asyncio.run(alternate())
    assert results[:5] == ["ok"] * 5
    for over in results[5:]:  # each replica refuses: the budget is the tenant's, not the replica's
        assert isinstance(over, RateLimitedError) and over.status_code == 429
        assert "limit of 5 requests per minute" in over.message
        assert 10.0 < over.retry_after_s <= 12.0  # 5/min: the next request is back 12 s after the first


def test_racing_admissions_on_two_replicas_never_take_more_than_the_limit(replicas):
    caller = Caller("racer", limits=TenantLimits(requests_per_min=5))

    async def race():
        return await asyncio.gather(*(run_request(replicas[i % 2], caller) for i in range(24)))

    results = asyncio.run(race())
    assert results.count("ok") == 5
    assert all(isinstance(r, RateLimitedError) for r in results if r != "ok")


def test_concurrency_limit_is_shared_and_a_finished_request_frees_its_slot_everywhere(replicas):
    caller = Caller("busy", limits=TenantLimits(max_concurrent=2))

    async def scenario():
        first = await open_request(replicas[0], caller)
        second = await open_request(replicas[1], caller)
        refused = [await run_request(quotas, caller) for quotas in replicas]
        await first.aclose()  # ends on replica 0 ...
        admitted = await run_request(replicas[1], caller)  # ... and replica 1 may run one again
        await second.aclose()
        return refused, admitted

    refused, admitted = asyncio.run(scenario())
    for over in refused:
        assert isinstance(over, RateLimitedError) and "limit of 2 concurrent requests" in over.message
        assert over.retry_after_s == 1.0
    assert admitted == "ok"


def test_tokens_charged_while_streaming_on_one_replica_are_seen_by_the_other(replicas):
    caller = Caller("chatty", limits=TenantLimits(tokens_per_min=60))  # refills 1 token per second

    async def scenario():
        streaming = await open_request(replicas[0], caller, num_prompt_tokens=60)  # 60 + 1 generated: -1 left
        over = await run_request(replicas[1], caller)
        await streaming.aclose()
        return over

    over = asyncio.run(scenario())
    assert isinstance(over, RateLimitedError) and "limit of 60 tokens per minute" in over.message
    assert 1.0 <= over.retry_after_s <= 2.0  # from about -1 back to 1 at 1 token/s


def test_batched_token_charges_add_up_to_every_streamed_token(make_meter, monkeypatch):
    caller = Caller("batched", limits=TenantLimits(tokens_per_min=60))
    streaming_meter = make_meter(charge_interval_s=0.05)
    charges: list[int] = []
    charge = streaming_meter.charge

    async def counted_charge(tenant, limits, num_tokens):
        charges.append(num_tokens)
        await charge(tenant, limits, num_tokens)

    monkeypatch.setattr(streaming_meter, "charge", counted_charge)
    streaming, other = QuotaManager(streaming_meter), QuotaManager(make_meter())

    async def scenario():
        # 8 prompt + 50 generated tokens over ~0.5 s: a few batches mid-stream, the rest when it ends.
        first = await run_request(streaming, caller, 8, (1,) * 50, pause_s=0.01)
        under = await run_request(other, caller, num_prompt_tokens=3, new_tokens_per_output=(1,))  # 58 used: 2 left
        over = await run_request(streaming, caller)  # 62 used: about -2
        return first, under, over

    first, under, over = asyncio.run(scenario())
    assert first == "ok" and under == "ok"
    assert isinstance(over, RateLimitedError) and "tokens per minute" in over.message
    assert 2 <= len(charges) < 50  # batched, not one round trip per token
    assert charges[0] == 9  # the first output (prompt + 1) is charged at once


def test_a_dead_replicas_slot_lapses_at_its_lease_and_keys_expire(make_meter, redis_url, redis_namespace):
    caller = Caller("orphaned", limits=TenantLimits(max_concurrent=1, requests_per_min=100, tokens_per_min=1000))
    dying, survivor = make_meter(slot_lease_s=0.5), QuotaManager(make_meter())

    async def scenario():
        await dying.admit(caller.tenant, caller.limits, "lost-request")  # admitted, then the replica dies
        refused = await run_request(survivor, caller)
        await asyncio.sleep(0.6)
        return refused, await run_request(survivor, caller)

    refused, admitted = asyncio.run(scenario())
    assert isinstance(refused, RateLimitedError) and "concurrent" in refused.message
    assert admitted == "ok"
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{redis_namespace}:quota:*"))
        assert {k.decode().rsplit(":", 1)[1] for k in keys} == {"requests", "tokens"}  # no slot held: none left
        # The buckets expire once they would have refilled (about 1 s here), so idle tenants leave nothing.
        assert all(0 < client.pttl(k) <= 2000 for k in keys)
    finally:
        client.close()


def test_a_request_cancelled_during_admission_gives_its_slot_back(make_meter, monkeypatch):
    caller = Caller("impatient", limits=TenantLimits(max_concurrent=1))
    slow_meter = make_meter()
    admit = slow_meter._admit

    def slow_admit(*args):
        time.sleep(0.2)  # the client disconnects while the admission script is on its way
        admit(*args)

    monkeypatch.setattr(slow_meter, "_admit", slow_admit)
    slow, other = QuotaManager(slow_meter), QuotaManager(make_meter())

    async def scenario():
        task = asyncio.create_task(run_request(slow, caller))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)  # the script has run and its slot has been given back
        return await run_request(other, caller)

    assert asyncio.run(scenario()) == "ok"


def test_an_unreachable_redis_refuses_admission_with_a_503():
    meter = RedisTenantMeter(f"redis://127.0.0.1:{free_port()}/0", slot_lease_s=60.0, socket_timeout=0.5)
    caller = Caller("stranded", limits=TenantLimits(requests_per_min=5))
    try:
        with pytest.raises(StoreUnavailableError) as info:
            asyncio.run(run_request(QuotaManager(meter), caller))
    finally:
        meter.close()
    assert info.value.status_code == 503 and "tenant quotas in Redis at redis://127.0.0.1:" in info.value.message


@pytest.fixture
def two_replicas(tiny_backbone, redis_url, redis_namespace):
    """Two real servers sharing one Redis for tenants and quotas; yields their URLs and the tenant's key."""
    registries = [RedisTenantRegistry(redis_url, namespace=redis_namespace) for _ in range(2)]
    registries[0].create("shared", limits=TenantLimits(requests_per_min=3))
    _, key = registries[0].add_key("shared")
    meters = [RedisTenantMeter(redis_url, namespace=redis_namespace, slot_lease_s=60.0) for _ in range(2)]
    with serving(tiny_backbone, auth=Authenticator(registries[0]), quotas=QuotaManager(meters[0])) as first, \
            serving(tiny_backbone, auth=Authenticator(registries[1]), quotas=QuotaManager(meters[1])) as second:
        yield [first[0], second[0]], key
    for closable in (*registries, *meters):
        closable.close()


def test_alternating_requests_across_two_servers_get_exactly_the_tenants_limit(two_replicas):
    urls, key = two_replicas
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": [1, 2, 3], "max_tokens": 2}  # token ids: the tiny backbone has no tokenizer
    with httpx.Client(timeout=60, headers=headers) as client:
        responses = [client.post(f"{urls[i % 2]}/v1/completions", json=body) for i in range(6)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429, 429], [r.text for r in responses]
    for over in responses[3:]:
        assert over.json()["error"]["type"] == "rate_limited"
        assert "limit of 3 requests per minute" in over.json()["error"]["message"]
        assert 1 <= int(over.headers["Retry-After"]) <= 20  # 3/min: one request back every 20 s
