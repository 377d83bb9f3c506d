"""RedisTenantMeter: tenants' rate limits metered in Redis, so every replica draws on one budget.

Keys ({ns} = namespace, <t> = tenant; the braces around the tenant are a hash tag, so one tenant's keys
share a Redis Cluster slot and a script may touch them together):
    {ns}:quota:{<t>}:requests  hash level/updated/capacity: the requests-per-minute token bucket
    {ns}:quota:{<t>}:tokens    hash level/updated/capacity: the tokens-per-minute token bucket
    {ns}:quota:{<t>}:slots     sorted set: the tenant's requests in flight, slot id -> expiry

Every read-modify-write is one Lua script, so it is atomic across replicas: admission (prune lapsed
slots, check concurrency and both buckets, then take a request and a slot) is a single call, and two
replicas can never both take the last slot or the last request. The scripts read the time with
redis.call('TIME'), so replicas' clocks never enter the buckets. A bucket's key expires once it would
have refilled to capacity (a missing key is a full bucket), and the slots key when its last slot
lapses, so an idle tenant leaves nothing behind.

Redis failures are StoreUnavailableError (503): admission never falls back to per-replica limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import redis

from prefixserve.adapters_store.redis_store import client_options, redact_url
from prefixserve.errors import ConfigError, StoreUnavailableError
from prefixserve.server.quotas import TenantMeter, over_concurrency, over_requests, over_tokens
from prefixserve.server.tenants import TenantLimits

# A slot outlives its request: admission sets its expiry to the request time limit plus this grace (see
# RedisTenantMeter), which covers admission, the final release and a slow Redis round trip.
SLOT_LEASE_GRACE_S = 30.0
CHARGE_INTERVAL_S = 0.2  # streamed tokens are charged at most this often per request (one round trip each)

# Redis >= 5 replicates a script's effects rather than the script, so reading TIME before writing is allowed.
_LUA_BUCKETS = """
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function num(x)  -- a float as a string: Lua numbers in a reply are truncated to integers
  return string.format('%.17g', x)
end

-- The level at `now`: a missing key (new, or expired once full) is a full bucket, and so is one written
-- under another capacity (the admin changed the limit), as the in-memory meter starts a new bucket then.
local function level_at(key, capacity, now)
  local state = redis.call('HMGET', key, 'level', 'updated', 'capacity')
  local level, updated = tonumber(state[1]), tonumber(state[2])
  if level == nil or updated == nil or tonumber(state[3]) ~= capacity then
    return capacity
  end
  return math.min(capacity, level + math.max(0, now - updated) * capacity / 60)
end

local function store(key, capacity, level, now)
  redis.call('HSET', key, 'level', num(level), 'updated', num(now), 'capacity', capacity)
  -- Once refilled to capacity the key says no more than a missing one does: let it expire then.
  redis.call('PEXPIRE', key, math.ceil((capacity - level) * 60000 / capacity) + 1000)
end
"""

# KEYS: slots, requests, tokens. ARGV: slot id, max concurrent, requests/min, tokens/min (0 = no limit),
# slot lease in seconds. Returns {0} when admitted, else {1 | 2 | 3, retry-after seconds as a string}
# for concurrency, requests or tokens; nothing is taken unless all three pass.
_ADMIT = _LUA_BUCKETS + """
local now = redis_now()
local slot_id, max_concurrent = ARGV[1], tonumber(ARGV[2])
local requests_per_min, tokens_per_min, lease_s = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- slots whose replica died without giving them back
if max_concurrent > 0 and redis.call('ZCARD', KEYS[1]) >= max_concurrent then
  return {1}
end
local requests
if requests_per_min > 0 then
  requests = level_at(KEYS[2], requests_per_min, now)
  if requests < 1 then
    return {2, num((1 - requests) * 60 / requests_per_min)}
  end
end
if tokens_per_min > 0 then
  local tokens = level_at(KEYS[3], tokens_per_min, now)
  if tokens <= 0 then
    return {3, num((1 - tokens) * 60 / tokens_per_min)}
  end
end
if requests_per_min > 0 then
  store(KEYS[2], requests_per_min, requests - 1, now)
end
redis.call('ZADD', KEYS[1], now + lease_s, slot_id)
redis.call('PEXPIRE', KEYS[1], math.ceil(lease_s * 1000))  -- every slot has the same lease: this is the last
return {0}
"""

# KEYS: slots, tokens. ARGV: tokens/min (0 = no limit), tokens to charge, slot id to give back ('' = none).
_SETTLE = _LUA_BUCKETS + """
local tokens_per_min, num_tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
if tokens_per_min > 0 and num_tokens > 0 then
  local now = redis_now()
  store(KEYS[2], tokens_per_min, level_at(KEYS[2], tokens_per_min, now) - num_tokens, now)
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[3])
end
return 0
"""


class RedisTenantMeter(TenantMeter):
    """`url` as redis-py takes it (the RedisStore's URL); `namespace` prefixes every key.

    Concurrency slots are protected against replicas that die mid-request by a fixed lease, not by
    heartbeats: each slot's expiry is set once, at admission, to `slot_lease_s` later, and the admission
    script drops lapsed slots before it counts. Give it the server's request time limit plus
    SLOT_LEASE_GRACE_S: every request is stopped by that limit, so a live request's slot never lapses
    (no replica stall, GC pause or Redis blip can let a tenant run over its concurrency, as a short lease
    renewed every few seconds would), while a crashed replica's slots come back by themselves at most
    one time limit later, with no survivor having to notice the crash. (A client that stops reading a
    stream can hold its request past the limit; its slot then lapses and the tenant may run one over.)

    Calls run the blocking client in a worker thread; each costs at most about 2 x `socket_timeout`."""

    def __init__(self, url: str, *, slot_lease_s: float, namespace: str = "prefixserve",
                 socket_timeout: float = 2.0, charge_interval_s: float = CHARGE_INTERVAL_S):
        if not (slot_lease_s > 0):
            raise ConfigError(f"expected a positive slot lease in seconds, found {slot_lease_s!r}")
        if not (charge_interval_s >= 0):
            raise ConfigError(f"expected a charge interval of 0 s or more, found {charge_interval_s!r}")
        if not namespace or not isinstance(namespace, str):
            raise ConfigError(f"expected a non-empty Redis namespace, found {namespace!r}")
        self.url = redact_url(url)
        self.namespace = namespace
        self.slot_lease_s = slot_lease_s
        self.charge_interval_s = charge_interval_s
        try:
            self._client = redis.Redis.from_url(url, **client_options(socket_timeout, retries=1))
        except ValueError as e:
            raise ConfigError(f"expected a redis:// or rediss:// URL, found {self.url!r} ({e})") from None
        # register_script: EVALSHA, loading the script again if Redis lost it (a restart)
        self._admit_script = self._client.register_script(_ADMIT)
        self._settle_script = self._client.register_script(_SETTLE)

    async def admit(self, tenant: str, limits: TenantLimits, slot_id: str) -> None:
        admission = asyncio.ensure_future(asyncio.to_thread(self._admit, tenant, limits, slot_id))
        try:
            await asyncio.shield(admission)
        except asyncio.CancelledError:
            # The client went away, but the script runs to its end in its thread and may take the slot
            # after all: give it back once it has (a no-op if it was refused), so it does not wait out its lease.
            loop = asyncio.get_running_loop()

            def give_back(done: asyncio.Future) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: a refusal nobody waits for any more is nothing to log
                loop.run_in_executor(None, self._settle_quietly, tenant, limits, slot_id)

            admission.add_done_callback(give_back)
            raise

    async def charge(self, tenant: str, limits: TenantLimits, num_tokens: int) -> None:
        if limits.tokens_per_min is not None and num_tokens > 0:
            await asyncio.to_thread(self._settle, "charge", tenant, limits, num_tokens, "")

    async def release(self, tenant: str, limits: TenantLimits, slot_id: str, num_tokens: int) -> None:
        await asyncio.to_thread(self._settle, "release", tenant, limits, num_tokens, slot_id)

    def close(self) -> None:
        self._client.close()

    # --- internals (blocking; run in worker threads) ---

    def _keys(self, tenant: str) -> dict[str, str]:
        base = f"{self.namespace}:quota:{{{tenant}}}"
        return {"slots": f"{base}:slots", "requests": f"{base}:requests", "tokens": f"{base}:tokens"}

    def _admit(self, tenant: str, limits: TenantLimits, slot_id: str) -> None:
        keys = self._keys(tenant)
        reply = self._call("admission", self._admit_script, [keys["slots"], keys["requests"], keys["tokens"]],
                           [slot_id, limits.max_concurrent or 0, limits.requests_per_min or 0,
                            limits.tokens_per_min or 0, self.slot_lease_s])
        code = int(reply[0])
        if code == 1:
            raise over_concurrency(tenant, limits)
        if code == 2:
            raise over_requests(tenant, limits, float(reply[1]))
        if code == 3:
            raise over_tokens(tenant, limits, float(reply[1]))

    def _settle(self, operation: str, tenant: str, limits: TenantLimits, num_tokens: int, slot_id: str) -> None:
        keys = self._keys(tenant)
        self._call(operation, self._settle_script, [keys["slots"], keys["tokens"]],
                   [limits.tokens_per_min or 0, num_tokens, slot_id])

    def _settle_quietly(self, tenant: str, limits: TenantLimits, slot_id: str) -> None:
        with contextlib.suppress(StoreUnavailableError):  # else the slot lapses at its lease
            self._settle("release", tenant, limits, 0, slot_id)

    def _call(self, operation: str, script: Callable, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except (redis.RedisError, OSError) as e:  # connection refused/lost, timeouts, LOADING, READONLY, ...
            raise StoreUnavailableError(f"the tenant quotas in Redis at {self.url} failed during {operation} "
                                        f"(expected an answer, found {type(e).__name__}: {e}); no request is "
                                        f"admitted until it answers") from e
