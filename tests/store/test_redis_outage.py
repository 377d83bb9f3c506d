"""A Redis outage: kill -9 the server, writes fail fast with a 503, the server comes back on the same
port and data, writes work again, nothing acknowledged is lost, and events flow again."""

import time

import pytest
import redis

from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.adapters_store.store import StoreEvent
from prefixserve.errors import StoreUnavailableError

SOCKET_TIMEOUT_S = 1.0


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s} s, found it still false")
        time.sleep(0.02)


def test_outage_fails_fast_then_recovers_without_loss(restartable_redis):
    store = RedisStore(restartable_redis.url, namespace="outage", socket_timeout=SOCKET_TIMEOUT_S)
    events = []
    store.subscribe(events.append)
    try:
        v1 = store.put("acme/t", b"version one", "prompt")
        wait_for(lambda: StoreEvent("acme/t", v1) in events, 5, "the event of the first put")

        restartable_redis.kill()
        for operation, call in [("put", lambda: store.put("acme/t", b"version two", "prompt")),
                                ("current", lambda: store.current("acme/t")),
                                ("get", lambda: store.get(v1))]:
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=f"{restartable_redis.url} failed during {operation}"):
                call()
            assert time.monotonic() - start < 2 * SOCKET_TIMEOUT_S + 1, f"{operation} did not fail fast"
        wait_for(lambda: not store.events_connected, 5, "the listener to notice the outage")

        restartable_redis.start()  # same port, same append-only file
        assert store.current("acme/t") == v1  # acknowledged before the crash: kept
        assert store.get(v1) == b"version one"
        v3 = store.put("acme/t", b"version three", "prompt")
        assert [r.version for r in store.history("acme/t")] == [v3, v1]
        # v3 arrives either live or replayed by the reconnecting listener; v4 surely live
        wait_for(lambda: StoreEvent("acme/t", v3) in events, 10, "the event of the put after the restart")
        wait_for(lambda: store.events_connected, 10, "the listener to reconnect")
        v4 = store.put("acme/u", b"version four", "lora")
        wait_for(lambda: StoreEvent("acme/u", v4) in events, 5, "a live event after the reconnect")
        assert store.list_tasks() == {"acme/t": v3, "acme/u": v4}
    finally:
        store.close()


def test_listener_replays_changes_made_while_it_was_away(restartable_redis):
    """pub/sub drops messages while a subscriber is disconnected; the reconnecting listener diffs the
    store against what it knew and delivers the changes (here: a put and a delete by another client)."""
    url, channel = restartable_redis.url, "gap:events"
    watcher, writer = (RedisStore(url, namespace="gap", socket_timeout=SOCKET_TIMEOUT_S) for _ in range(2))
    admin = redis.Redis.from_url(url)
    events = []
    try:
        writer.put("kept", b"a", "prompt")
        watcher.subscribe(events.append)
        for attempt in range(20):
            doomed = writer.put("doomed", f"b{attempt}".encode(), "prompt")
            wait_for(lambda v=doomed: StoreEvent("doomed", v) in events, 5, "the live event of a put")
            admin.client_kill_filter(_type="pubsub")  # drop the listener's connection
            fresh = writer.put("kept", f"c{attempt}".encode(), "prompt")
            writer.delete("doomed")
            if admin.pubsub_numsub(channel) == [(channel.encode(), 0)]:
                break  # nobody was subscribed during both writes: only a replay can deliver them
            events.clear()  # the listener came back too fast to test anything: again
        else:
            raise AssertionError("expected to make changes while the listener was away, found it always back")
        wait_for(lambda: {StoreEvent("kept", fresh), StoreEvent("doomed", None)} <= set(events), 10,
                 "replayed events for the put and the delete made while the listener was away")
    finally:
        admin.close()
        watcher.close()
        writer.close()
