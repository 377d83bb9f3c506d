"""The AdapterStore contract, run against LocalStore and RedisStore alike."""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from store_cases import valid_parts

from prefixserve.adapters_store import artifact_version, encode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.adapters_store.store import MAX_HISTORY, AdapterStore, StoreEvent
from prefixserve.errors import InvalidRequestError, StoreCorruptError, StoreUnavailableError, TaskNotFoundError

UNKNOWN_VERSION = "0" * 64


@dataclass
class Backend:
    make: Callable[[], AdapterStore]  # another client of the same store (same root / same namespace)
    corrupt: Callable[[str], None]  # overwrite a version's blob with other bytes


@pytest.fixture(params=["local", "redis"])
def backend(request, tmp_path):
    stores = []
    if request.param == "local":
        root = tmp_path / "store"

        def make():
            return LocalStore(root)

        def corrupt(version):
            (root / "blobs" / version[:2] / version).write_bytes(b"bit rot")
    else:
        url, namespace = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_namespace")

        def make():
            return RedisStore(url, namespace=namespace)

        def corrupt(version):
            with redis.Redis.from_url(url) as client:
                client.set(f"{namespace}:blob:{version}", b"bit rot")

    def tracked():
        stores.append(make())
        return stores[-1]
    yield Backend(tracked, corrupt)
    for store in stores:
        store.close()


@pytest.fixture
def store(backend):
    return backend.make()


def payload(n: int) -> bytes:
    return f"artifact {n} ".encode() * (n % 7 + 1)


def wait_for(predicate, timeout_s=5.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s} s, found it still false")
        time.sleep(0.01)


def test_put_current_get_round_trip(store):
    data = encode_artifact("prompt", *valid_parts("prompt"), {"backbone": "any"})
    version = store.put("acme/sentiment", data, "prompt")
    assert version == artifact_version(data)
    assert store.current("acme/sentiment") == version
    assert store.get(version) == data
    [record] = store.history("acme/sentiment")
    assert (record.version, record.kind, record.num_bytes) == (version, "prompt", len(data))
    assert abs(record.created_at - time.time()) < 60


def test_history_is_newest_first_and_capped(store):
    versions = [store.put("t", payload(i), "lora") for i in range(MAX_HISTORY + 3)]
    history = store.history("t")
    assert [r.version for r in history] == versions[::-1][:MAX_HISTORY]
    assert [r.num_bytes for r in history] == [len(payload(i)) for i in range(MAX_HISTORY + 3)][::-1][:MAX_HISTORY]
    assert all(a.created_at >= b.created_at for a, b in zip(history, history[1:]))
    assert store.get(versions[0]) == payload(0)  # fell off the history, blob kept


def test_list_tasks_by_prefix_and_odd_names(store):
    names = ["acme/sentiment", "acme/ner:v2", "acme.x", "globex/sum.v1-x_y", "a*[?]\\", "é/" + "n" * 250]
    versions = {name: store.put(name, payload(i), "prefix") for i, name in enumerate(names)}
    assert store.list_tasks() == versions
    assert store.list_tasks("acme/") == {n: versions[n] for n in ("acme/sentiment", "acme/ner:v2")}
    assert store.list_tasks("acme") == {n: versions[n] for n in ("acme/sentiment", "acme/ner:v2", "acme.x")}
    assert store.list_tasks("a*") == {"a*[?]\\": versions["a*[?]\\"]}
    assert store.list_tasks("é/") == {names[-1]: versions[names[-1]]}
    assert store.list_tasks("nobody/") == {}


def test_rollback_default_explicit_and_unknown(store):
    v1, v2, v3 = (store.put("t", payload(i), "prompt") for i in range(3))
    assert store.rollback("t") == v2  # default: the previous version
    assert store.current("t") == v2
    assert [r.version for r in store.history("t")] == [v2, v3, v2, v1]  # the rollback is a history entry
    assert store.rollback("t", v1) == v1
    assert store.current("t") == v1
    with pytest.raises(TaskNotFoundError, match=f"expected version {UNKNOWN_VERSION} in the history of task 't'"):
        store.rollback("t", UNKNOWN_VERSION)
    with pytest.raises(TaskNotFoundError, match="expected task 'nope' in the store"):
        store.rollback("nope")
    with pytest.raises(InvalidRequestError, match="sha256 hex digest, found 'v1'"):
        store.rollback("t", "v1")
    store.put("single", payload(9), "prompt")
    with pytest.raises(InvalidRequestError, match="earlier version to roll back to, found only"):
        store.rollback("single")
    assert store.current("t") == v1  # refused rollbacks change nothing


def test_delete(store):
    version = store.put("t", payload(1), "prompt")
    store.put("other", payload(2), "prompt")
    store.delete("t")
    assert store.current("t") is None and store.history("t") == []
    assert store.list_tasks() == {"other": store.current("other")}
    assert store.get(version) == payload(1)  # blobs stay for running requests
    with pytest.raises(TaskNotFoundError, match="expected task 't' in"):
        store.delete("t")
    assert store.put("t", payload(3), "lora") == artifact_version(payload(3))
    assert len(store.history("t")) == 1  # a re-created task starts a fresh history


def test_unknown_task_and_version(store):
    assert store.current("nope") is None and store.history("nope") == [] and store.list_tasks() == {}
    with pytest.raises(TaskNotFoundError, match=f"expected artifact version {UNKNOWN_VERSION}"):
        store.get(UNKNOWN_VERSION)
    with pytest.raises(InvalidRequestError, match="found '../../etc/passwd'"):
        store.get("../../etc/passwd")


@pytest.mark.parametrize("task, data, kind, message", [
    ("", b"x", "prompt", "task name of 1..256 printable characters, found ''"),
    ("a\nb", b"x", "prompt", "printable characters"),
    ("t" * 257, b"x", "prompt", "1..256"),
    ("t", b"", "prompt", "non-empty artifact bytes, found 0 bytes"),
    ("t", "text", "prompt", "artifact bytes, found str"),
    ("t", b"x", "", "non-empty kind name"),
])
def test_bad_put_is_refused(store, task, data, kind, message):
    with pytest.raises(InvalidRequestError, match=message):
        store.put(task, data, kind)
    assert store.list_tasks() == {}


def test_reput_of_identical_bytes_is_idempotent(store):
    events = []
    store.subscribe(events.append)
    version = store.put("t", payload(1), "prompt")
    assert store.put("t", payload(1), "prompt") == version
    assert len(store.history("t")) == 1
    assert store.put("u", payload(1), "prompt") == version  # the same blob serves two tasks
    wait_for(lambda: len(events) == 2, what="two events")
    assert events == [StoreEvent("t", version), StoreEvent("u", version)]
    assert store.get(version) == payload(1)


def test_events_reach_this_and_another_client(backend):
    writer, reader = backend.make(), backend.make()
    mine, theirs = [], []
    writer.subscribe(mine.append)
    reader.subscribe(theirs.append)
    v1 = writer.put("acme/t", payload(1), "prompt")
    v2 = writer.put("acme/t", payload(2), "prompt")
    assert writer.rollback("acme/t") == v1
    writer.delete("acme/t")
    expected = [StoreEvent("acme/t", v) for v in (v1, v2, v1, None)]
    wait_for(lambda: len(mine) >= 4 and len(theirs) >= 4, what="4 events at both clients")
    assert mine == theirs == expected
    assert reader.current("acme/t") is None


def test_unsubscribe_stops_delivery(store):
    kept, dropped = [], []
    store.subscribe(kept.append)
    unsubscribe = store.subscribe(dropped.append)
    store.put("t", payload(1), "prompt")
    wait_for(lambda: len(dropped) == 1, what="the first event")
    unsubscribe()
    store.put("t", payload(2), "prompt")
    wait_for(lambda: len(kept) == 2, what="the second event")
    assert len(dropped) == 1


def test_slow_or_failing_subscriber_blocks_no_writer(store):
    release, seen = threading.Event(), []
    store.subscribe(lambda event: release.wait(10))

    def failing(event):
        raise RuntimeError("subscriber bug")
    store.subscribe(failing)
    store.subscribe(seen.append)
    start = time.monotonic()
    for i in range(3):
        store.put("t", payload(i), "prompt")
    assert time.monotonic() - start < 1.0
    release.set()
    wait_for(lambda: len(seen) == 3, what="3 events after the slow subscriber returned")


def test_concurrent_puts_to_one_task_lose_no_history(backend):
    num_threads, puts_each = 4, 6  # 24 entries <= MAX_HISTORY: every one must stay
    stores = [backend.make() for _ in range(num_threads)]  # one client each, as replicas would be
    barrier = threading.Barrier(num_threads)
    errors = []

    def write(t):
        barrier.wait()
        try:
            for i in range(puts_each):
                stores[t].put("t", payload(100 * t + i) + os.urandom(8), "prompt")
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=write, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    history = stores[0].history("t")
    assert len({r.version for r in history}) == len(history) == num_threads * puts_each
    assert stores[0].current("t") == history[0].version


def test_corrupt_blob_is_refused_naming_the_version(backend):
    store = backend.make()
    version = store.put("t", payload(1), "prompt")
    backend.corrupt(version)
    with pytest.raises(StoreCorruptError, match=f"{version}.*found {artifact_version(b'bit rot')}"):
        store.get(version)
    assert store.put("t", payload(1), "prompt") == version  # a re-put repairs the blob
    assert store.get(version) == payload(1)


def test_local_task_files_are_flat_and_named_safely(tmp_path):
    store = LocalStore(tmp_path)
    store.put("acme/../x:y", payload(1), "prompt")
    store.put("z" * 256, payload(2), "prompt")
    names = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert len(names) == 2 and names[1] == "acme%2F..%2Fx%3Ay.json" and names[0].startswith("#")
    assert not list(tmp_path.glob("x*")) and all(Path(tmp_path / "tasks" / n).is_file() for n in names)
    assert LocalStore(tmp_path).list_tasks() == {"acme/../x:y": artifact_version(payload(1)),
                                                 "z" * 256: artifact_version(payload(2))}


def test_redis_unreachable_is_a_503_naming_url_and_operation():
    from redis_server import free_port

    store = RedisStore(f"redis://:secret@127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"redis://:\*\*\*@127.0.0.1:\d+/0 failed during put") as e:
        store.put("t", b"x", "prompt")
    assert "secret" not in e.value.message and time.monotonic() - start < 2
    assert StoreUnavailableError.status_code == 503
    store.close()
