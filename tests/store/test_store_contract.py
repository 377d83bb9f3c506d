"""The AdapterStore contract, run against LocalStore and RedisStore alike."""

import contextlib
import os
import random
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
from prefixserve.adapters_store.store import DEFAULT_MAX_HISTORY, AdapterStore, StoreEvent
from prefixserve.errors import (
    ConfigError,
    InvalidRequestError,
    StoreCorruptError,
    StoreUnavailableError,
    TaskNotFoundError,
)

UNKNOWN_VERSION = "0" * 64


@dataclass
class Backend:
    # another client of the same store (same root / same namespace); options: max_history, gc_grace_s
    make: Callable[..., AdapterStore]
    corrupt: Callable[[str], None]  # overwrite a version's blob with other bytes
    stored_versions: Callable[[], set[str]]  # the versions that have a blob, looked at directly


@pytest.fixture(params=["local", "redis"])
def backend(request, tmp_path):
    stores = []
    if request.param == "local":
        root = tmp_path / "store"

        def make(**options):
            return LocalStore(root, **options)

        def corrupt(version):
            (root / "blobs" / version[:2] / version).write_bytes(b"bit rot")

        def stored_versions():
            return {p.name for p in (root / "blobs").glob("*/*") if not p.name.endswith(".tmp")}
    else:
        url, namespace = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_namespace")

        def make(**options):
            return RedisStore(url, namespace=namespace, **options)

        def corrupt(version):
            with redis.Redis.from_url(url) as client:
                client.set(f"{namespace}:blob:{version}", b"bit rot")

        def stored_versions():
            with redis.Redis.from_url(url) as client:
                return {key.decode().rsplit(":", 1)[1] for key in client.scan_iter(f"{namespace}:blob:*")}

    def tracked(**options):
        stores.append(make(**options))
        return stores[-1]
    yield Backend(tracked, corrupt, stored_versions)
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
    assert store.max_history == DEFAULT_MAX_HISTORY == 8
    versions = [store.put("t", payload(i), "lora") for i in range(DEFAULT_MAX_HISTORY + 3)]
    history = store.history("t")
    assert [r.version for r in history] == versions[::-1][:DEFAULT_MAX_HISTORY]
    assert [r.num_bytes for r in history] == [len(payload(i)) for i in range(11)][::-1][:DEFAULT_MAX_HISTORY]
    assert all(a.created_at >= b.created_at for a, b in zip(history, history[1:]))
    assert store.get(versions[0]) == payload(0)  # fell off the history, blob kept for the grace period


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


CARD = {"kind": "prompt", "num_train": 40, "metrics": {"exact_match": 0.9, "best_baseline_exact_match": 0.5},
        "baselines_skipped": {"instruction": "the job has no instruction"}, "suite_task": None}


def test_a_card_is_kept_with_its_version_through_rollback_and_reopening(backend):
    store = backend.make()
    carded = store.put("t", payload(1), "prompt", card=CARD)
    plain = store.put("t", payload(2), "prompt")
    assert store.rollback("t") == carded
    reopened = backend.make()  # what was persisted, read by another client
    assert [(r.version, r.card) for r in reopened.history("t")] == [(carded, CARD), (plain, None), (carded, CARD)]
    assert "card" not in reopened.history("t")[1].to_json()  # records without one keep their old form
    assert reopened.put("t", payload(1), "prompt", card={"other": 1}) == carded  # already current: no change
    assert reopened.history("t")[0].card == CARD and len(reopened.history("t")) == 3


@pytest.mark.parametrize("card, message", [
    (["not", "an", "object"], "expected the card to be a JSON object, found list"),
    ({"metrics": {"exact_match": float("nan")}}, "finite numbers"),
    ({"blob": b"bytes"}, "JSON values with finite numbers"),
    ({"text": "x" * (64 * 1024)}, "card of at most 65536 bytes as JSON, found 65548"),
])
def test_a_bad_card_is_refused_storing_nothing(backend, card, message):
    store = backend.make()
    with pytest.raises(InvalidRequestError, match=message):
        store.put("t", payload(1), "prompt", card=card)
    assert store.list_tasks() == {} and backend.stored_versions() == set()


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
    num_threads, puts_each = 4, 6  # 24 entries <= max_history: every one must stay
    stores = [backend.make(max_history=24) for _ in range(num_threads)]  # one client each, as replicas would be
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


# --- retention: bounded histories, garbage-collected blobs ---

GRACE_S = 60.0


def after_grace() -> float:
    return time.time() + GRACE_S + 1


def test_history_is_bounded_at_max_history(backend):
    store = backend.make(max_history=3)
    versions = [store.put("t", payload(i), "prompt") for i in range(5)]
    assert [r.version for r in store.history("t")] == versions[:1:-1]
    with pytest.raises(TaskNotFoundError, match=f"expected version {versions[1]} in the history of task 't'"):
        store.rollback("t", versions[1])  # fell out of the history: no longer a rollback target
    assert store.rollback("t") == versions[3]
    assert [r.version for r in store.history("t")] == [versions[3], versions[4], versions[3]]
    assert store.histories() == {"t": store.history("t")}


@pytest.mark.parametrize("options, message", [
    ({"max_history": 0}, "expected max_history to be a positive number of history entries, found 0"),
    ({"max_history": True}, "max_history .* found True"),
    ({"gc_grace_s": -1}, "expected gc_grace_s to be a finite number of seconds >= 0, found -1"),
    ({"gc_grace_s": float("inf")}, "gc_grace_s .* found inf"),
])
def test_retention_options_are_validated(backend, options, message):
    with pytest.raises(ConfigError, match=message):
        backend.make(**options)


def test_a_blob_out_of_every_history_is_collected_after_the_grace_period(backend):
    store = backend.make(max_history=2, gc_grace_s=GRACE_S)
    v0, v1, v2 = (store.put("t", payload(i), "prompt") for i in range(3))
    assert store.collect_garbage() == 0  # v0 is an orphan, not yet for long enough
    assert store.get(v0) == payload(0)  # a request that pinned it a moment ago still finds it
    assert store.collect_garbage(now=after_grace()) == 1
    with pytest.raises(TaskNotFoundError, match=f"expected artifact version {v0}"):
        store.get(v0)
    assert backend.stored_versions() == {v1, v2}
    assert [store.get(v1), store.get(v2)] == [payload(1), payload(2)]
    assert store.collect_garbage(now=after_grace()) == 0


def test_a_blob_another_task_still_holds_survives(backend):
    store = backend.make(max_history=1, gc_grace_s=GRACE_S)
    shared = store.put("a", payload(1), "prompt")
    assert store.put("b", payload(1), "prompt") == shared
    store.put("a", payload(2), "prompt")  # shared leaves a's history; b's still holds it
    assert store.collect_garbage(now=after_grace()) == 0
    assert store.get(shared) == payload(1)
    store.delete("b")
    assert store.collect_garbage(now=after_grace()) == 1
    with pytest.raises(TaskNotFoundError):
        store.get(shared)


def test_a_blob_put_again_during_the_grace_period_survives(backend):
    store = backend.make(max_history=1, gc_grace_s=GRACE_S)
    v1 = store.put("a", payload(1), "prompt")
    v2 = store.put("a", payload(2), "prompt")  # v1 is an orphan ...
    assert store.put("a", payload(1), "prompt") == v1  # ... until it is uploaded again; now v2 is one
    assert store.collect_garbage(now=after_grace()) == 1
    assert store.get(v1) == payload(1) and backend.stored_versions() == {v1}
    with pytest.raises(TaskNotFoundError, match=f"expected artifact version {v2}"):
        store.get(v2)


def test_the_grace_period_counts_from_when_a_blob_last_lost_its_reference(backend):
    store = backend.make(max_history=1, gc_grace_s=GRACE_S)
    v1 = store.put("a", payload(1), "prompt")
    store.put("a", payload(2), "prompt")  # v1 orphaned ...
    store.put("b", payload(1), "prompt")  # ... referenced again ...
    between = time.time()
    time.sleep(0.02)
    store.delete("b")  # ... and orphaned again, later
    assert store.collect_garbage(now=between + GRACE_S) == 0
    assert store.get(v1) == payload(1)
    assert store.collect_garbage(now=after_grace()) == 1
    assert backend.stored_versions() == {store.current("a")}


def test_deleting_a_task_orphans_its_blobs(backend):
    store = backend.make(gc_grace_s=GRACE_S)
    v1, v2 = store.put("t", payload(1), "prompt"), store.put("t", payload(2), "prompt")
    kept = store.put("other", payload(3), "prompt")
    store.delete("t")
    assert store.collect_garbage() == 0  # within the grace period: requests that pinned them still find them
    assert [store.get(v1), store.get(v2)] == [payload(1), payload(2)]
    assert store.collect_garbage(now=after_grace()) == 2
    for version in (v1, v2):
        with pytest.raises(TaskNotFoundError, match=f"expected artifact version {version}"):
            store.get(version)
    assert backend.stored_versions() == {kept}


def test_puts_and_deletes_collect_without_being_asked(backend):
    store = backend.make(max_history=2, gc_grace_s=0)
    versions = [store.put("t", payload(i), "prompt") for i in range(6)]
    assert backend.stored_versions() == set(versions[-2:])
    store.delete("t")
    assert backend.stored_versions() == set()


def test_retained_bytes_counts_each_retained_version_once(backend):
    store = backend.make(max_history=2)
    for i in range(3):
        store.put("acme/a", payload(i), "prompt")  # retains payloads 2 and 1
    store.put("acme/b", payload(2), "prompt")  # the same bytes as a's current version: counted once
    store.put("acmex/c", payload(3), "prompt")
    assert store.retained_bytes("acme/") == len(payload(1)) + len(payload(2))
    assert store.retained_bytes() == len(payload(1)) + len(payload(2)) + len(payload(3))
    assert store.retained_bytes("nobody/") == 0
    assert sorted(store.histories("acme/")) == ["acme/a", "acme/b"]
    store.delete("acme/a")
    assert store.retained_bytes("acme/") == len(payload(2))  # retained, not stored: the blob waits for GC


def test_two_clients_putting_and_collecting_never_delete_a_referenced_blob(backend):
    clients = [backend.make(max_history=2, gc_grace_s=0) for _ in range(2)]
    tasks, pool = ["a", "b", "c"], [payload(i) for i in range(5)]  # few payloads: tasks share versions
    barrier, errors = threading.Barrier(len(clients)), []

    def work(n):
        rng = random.Random(n)
        barrier.wait()
        try:
            for _ in range(150):
                task = rng.choice(tasks)
                if rng.random() < 0.15:
                    with contextlib.suppress(TaskNotFoundError):
                        clients[n].delete(task)
                else:
                    clients[n].put(task, rng.choice(pool), "prompt")
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    referenced = {r.version for history in clients[0].histories().values() for r in history}
    for version in referenced:
        assert clients[1].get(version) in pool  # every retained version still has its bytes
    clients[0].collect_garbage()
    assert backend.stored_versions() == referenced  # and nothing else is left: the references were exact


def test_redis_collection_between_a_puts_blob_write_and_its_commit_keeps_the_blob(redis_url, redis_namespace):
    """The one window LocalStore does not have (it holds its lock throughout): another replica collects
    the blob after this put found it present and before the put commits a reference to it."""
    writer, collector = (RedisStore(redis_url, namespace=redis_namespace, max_history=1, gc_grace_s=GRACE_S)
                         for _ in range(2))
    v1 = writer.put("a", payload(1), "prompt")
    writer.put("a", payload(2), "prompt")  # v1 is an orphan
    write_blob = writer._write_blob

    def write_blob_then_collect(version, data):
        write_blob(version, data)  # finds the blob present
        assert collector.collect_garbage(now=after_grace()) == 1  # and the collector deletes it
    writer._write_blob = write_blob_then_collect
    assert writer.put("b", payload(1), "prompt") == v1
    assert writer.get(v1) == payload(1)
    writer.close()
    collector.close()


def test_redis_store_written_before_gc_keeps_the_blobs_its_histories_hold(redis_url, redis_namespace):
    """Histories put before garbage collection existed have no refs:* sets: the first collection must
    build them, or a version two tasks share would look unreferenced once one task drops it."""
    store = RedisStore(redis_url, namespace=redis_namespace, max_history=1, gc_grace_s=GRACE_S)
    shared = store.put("a", payload(1), "prompt")
    store.put("b", payload(1), "prompt")
    with redis.Redis.from_url(redis_url) as client:  # as an older prefixserve left it
        client.delete(*client.keys(f"{redis_namespace}:refs*"))
    store.close()
    store = RedisStore(redis_url, namespace=redis_namespace, max_history=1, gc_grace_s=GRACE_S)
    store.put("a", payload(2), "prompt")  # shared leaves a's history; b's still holds it
    assert store.collect_garbage(now=after_grace()) == 0
    assert store.get(shared) == payload(1)
    store.close()


# --- requires: an intrinsic's subspace stays while a retained entry needs it ---

def put_subspace_and_intrinsic(store: AdapterStore) -> tuple[str, str]:
    subspace = store.put("acme/space", payload(1), "subspace")
    return subspace, store.put("acme/ipt", payload(2), "intrinsic", requires=(subspace,))


@pytest.mark.parametrize("subspace_leaves", ["deleted", "retrained"])
def test_a_required_blob_outlives_its_own_task(backend, subspace_leaves):
    store = backend.make(max_history=2, gc_grace_s=GRACE_S)
    subspace, intrinsic = put_subspace_and_intrinsic(store)
    if subspace_leaves == "deleted":
        store.delete("acme/space")
    else:
        retrained = [store.put("acme/space", payload(i), "subspace") for i in (3, 4)]
        assert [r.version for r in store.history("acme/space")] == retrained[::-1]
    assert store.collect_garbage(now=after_grace()) == 0
    assert store.get(subspace) == payload(1)  # the intrinsic task's next cold load still finds its decoder
    assert store.history("acme/ipt")[0].requires == (subspace,)
    assert store.get(intrinsic) == payload(2)


@pytest.mark.parametrize("intrinsic_leaves", ["deleted", "retrained"])
def test_a_required_blob_is_collected_once_no_retained_entry_requires_it(backend, intrinsic_leaves):
    store = backend.make(max_history=2, gc_grace_s=GRACE_S)
    subspace, intrinsic = put_subspace_and_intrinsic(store)
    store.delete("acme/space")
    kept = set()
    if intrinsic_leaves == "deleted":
        store.delete("acme/ipt")
    else:
        kept.add(store.put("acme/ipt", payload(3), "intrinsic"))  # the old entry, a rollback target, still requires it
        assert store.collect_garbage(now=after_grace()) == 0
        kept.add(store.put("acme/ipt", payload(4), "intrinsic"))  # now it falls out of the history
    assert store.collect_garbage() == 0  # within the grace period
    assert store.get(subspace) == payload(1)
    assert store.collect_garbage(now=after_grace()) == 2  # the subspace and the intrinsic version
    for version in (subspace, intrinsic):
        with pytest.raises(TaskNotFoundError, match=f"expected artifact version {version}"):
            store.get(version)
    assert backend.stored_versions() == kept


def test_requires_naming_a_version_not_stored_is_refused_storing_nothing(backend):
    store = backend.make(gc_grace_s=GRACE_S)
    existing = store.put("acme/ipt", payload(1), "intrinsic")
    before = store.history("acme/ipt")
    for task in ("acme/ipt", "acme/new"):
        with pytest.raises(TaskNotFoundError, match=f"expected the versions task {task!r} requires to be stored, "
                                                     f"found no blob for {UNKNOWN_VERSION};"):
            store.put(task, payload(2), "intrinsic", requires=(existing, UNKNOWN_VERSION))
    assert store.history("acme/ipt") == before and store.list_tasks() == {"acme/ipt": existing}
    assert backend.stored_versions() == {existing}
    gone = store.put("acme/space", payload(3), "subspace")
    store.delete("acme/space")
    assert store.collect_garbage(now=after_grace()) == 1
    with pytest.raises(TaskNotFoundError, match=f"found no blob for {gone}"):  # collected: no longer stored
        store.put("acme/ipt", payload(2), "intrinsic", requires=(gone,))
    assert store.history("acme/ipt") == before and backend.stored_versions() == {existing}


@pytest.mark.parametrize("requires, message", [
    (("v1",), "expected a version as a 64-character lower-case sha256 hex digest, found 'v1'"),
    ("ab" * 32, "expected requires to be a tuple of versions, found str"),
])
def test_malformed_requires_are_refused(store, requires, message):
    with pytest.raises(InvalidRequestError, match=message):
        store.put("acme/ipt", payload(1), "intrinsic", requires=requires)
    assert store.list_tasks() == {}


def test_requires_persist_through_rollback_and_reopening(backend):
    store = backend.make(max_history=3, gc_grace_s=GRACE_S)
    subspace, intrinsic = put_subspace_and_intrinsic(store)
    plain = store.put("acme/ipt", payload(3), "intrinsic")
    assert store.rollback("acme/ipt") == intrinsic
    reopened = backend.make(max_history=3, gc_grace_s=GRACE_S)  # a new client: what was persisted
    assert [(r.version, r.requires) for r in reopened.history("acme/ipt")] == [
        (intrinsic, (subspace,)), (plain, ()), (intrinsic, (subspace,))]
    assert reopened.histories() == {"acme/space": reopened.history("acme/space"),
                                    "acme/ipt": reopened.history("acme/ipt")}
    reopened.delete("acme/space")
    for i in (4, 5):
        reopened.put("acme/ipt", payload(i), "intrinsic")  # only the rollback's entry still requires it
    assert reopened.collect_garbage(now=after_grace()) == 1  # `plain` fell out; the subspace stays
    assert reopened.get(subspace) == payload(1)
    assert reopened.rollback("acme/ipt", intrinsic) == intrinsic
    assert reopened.history("acme/ipt")[0].requires == (subspace,)


def test_reputting_the_current_version_with_its_requirement_records_it(backend):
    """Versions put before `requires` existed require nothing: re-putting the same bytes with their
    requirement is a new entry (it protects the subspace), not an idempotent no-op."""
    store = backend.make(gc_grace_s=GRACE_S)
    subspace = store.put("acme/space", payload(1), "subspace")
    intrinsic = store.put("acme/ipt", payload(2), "intrinsic")
    assert store.put("acme/ipt", payload(2), "intrinsic", requires=(subspace,)) == intrinsic
    assert [r.requires for r in store.history("acme/ipt")] == [(subspace,), ()]
    assert store.put("acme/ipt", payload(2), "intrinsic", requires=(subspace,)) == intrinsic
    assert len(store.history("acme/ipt")) == 2  # now it is idempotent
    store.delete("acme/space")
    assert store.collect_garbage(now=after_grace()) == 0 and store.get(subspace) == payload(1)


def test_two_clients_putting_with_requires_never_delete_a_required_blob(backend):
    clients = [backend.make(max_history=2, gc_grace_s=0) for _ in range(2)]
    intrinsics = [payload(i) for i in range(10, 14)]  # few: tasks share versions
    stored = {artifact_version(data): data for data in intrinsics}  # version -> bytes, of every put
    recent_subspaces, num_required = [], []  # fresh subspace bytes every time: a lost blob is never re-put
    barrier, errors = threading.Barrier(len(clients)), []

    def work(n):
        rng = random.Random(n)
        barrier.wait()
        try:
            for i in range(150):
                task = rng.choice(["space", "ipt-a", "ipt-b"])
                with contextlib.suppress(TaskNotFoundError):  # deleted already, or its subspace collected
                    if rng.random() < 0.15:
                        clients[n].delete(task)
                    elif task == "space" or not recent_subspaces:
                        data = payload(1000 * n + i) + os.urandom(8)
                        stored[artifact_version(data)] = data
                        recent_subspaces.append(clients[n].put("space", data, "subspace"))
                    else:
                        clients[n].put(task, rng.choice(intrinsics), "intrinsic",
                                       requires=(rng.choice(recent_subspaces[-3:]),))
                        num_required.append(task)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(num_required) > 20  # puts with requires landed, not only refusals
    for i in range(2):  # the subspace task moves on: what the intrinsic tasks require is theirs alone to keep
        data = payload(5000 + i) + os.urandom(8)
        stored[clients[0].put("space", data, "subspace")] = data
    histories = clients[0].histories().values()
    referenced = {version for history in histories for r in history for version in (r.version, *r.requires)}
    for version in referenced:
        assert clients[1].get(version) == stored[version]  # every retained or required version has its bytes
    clients[0].collect_garbage()
    assert backend.stored_versions() == referenced  # and nothing else: the references were exact


def test_redis_refs_rebuild_includes_required_versions(redis_url, redis_namespace):
    store = RedisStore(redis_url, namespace=redis_namespace, gc_grace_s=GRACE_S)
    subspace, _ = put_subspace_and_intrinsic(store)
    with redis.Redis.from_url(redis_url) as client:  # refs never built, as by a store from before GC
        client.delete(*client.keys(f"{redis_namespace}:refs*"))
    store.close()
    store = RedisStore(redis_url, namespace=redis_namespace, gc_grace_s=GRACE_S)
    store.delete("acme/space")  # its collection builds the refs first
    assert store.collect_garbage(now=after_grace()) == 0
    assert store.get(subspace) == payload(1)
    store.close()


def test_redis_collection_of_a_required_blob_during_a_put_refuses_the_put(redis_url, redis_namespace):
    """Another replica collects the required blob after this put found it present: the put must see that
    in its transaction and refuse, not commit an entry whose subspace is gone."""
    writer, collector = (RedisStore(redis_url, namespace=redis_namespace, gc_grace_s=GRACE_S) for _ in range(2))
    subspace = writer.put("acme/space", payload(1), "subspace")
    writer.delete("acme/space")  # an orphan: collectable once nothing requires it
    write_blob = writer._write_blob

    def write_blob_then_collect(version, data):
        write_blob(version, data)
        assert collector.collect_garbage(now=after_grace()) == 2  # the subspace (and this put's own blob)
    writer._write_blob = write_blob_then_collect
    with pytest.raises(TaskNotFoundError, match=f"found no blob for {subspace}"):
        writer.put("acme/ipt", payload(2), "intrinsic", requires=(subspace,))
    assert writer.list_tasks() == {}
    writer.close()
    collector.close()
