"""LocalStore across processes: a change made by another process on the same directory (a worker
publishing a trained task) reaches this process's subscribers within a second, once."""

import subprocess
import sys
import time

from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.store import StoreEvent

WRITER = """
import sys
from prefixserve.adapters_store.local_store import LocalStore
store = LocalStore(sys.argv[1])
action, task = sys.argv[2], sys.argv[3]
if action == "put":
    print(store.put(task, sys.argv[4].encode(), "prompt"))
else:
    store.delete(task)
"""


def other_process(root, *args) -> str:
    out = subprocess.run([sys.executable, "-c", WRITER, str(root), *args], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_another_processs_put_rollback_and_delete_reach_subscribers(tmp_path):
    store = LocalStore(tmp_path)
    before = store.put("old", b"already there", "prompt")  # exists before subscribing: not news
    events = []
    store.subscribe(events.append)
    v1 = other_process(tmp_path, "put", "acme/t", "one")
    assert wait_for(lambda: StoreEvent("acme/t", v1) in events)
    v2 = other_process(tmp_path, "put", "acme/t", "two")
    assert wait_for(lambda: StoreEvent("acme/t", v2) in events)
    other_process(tmp_path, "delete", "acme/t")
    assert wait_for(lambda: StoreEvent("acme/t", None) in events)
    time.sleep(0.6)  # a few more polls: nothing is reported twice, the old task never
    assert events == [StoreEvent("acme/t", v1), StoreEvent("acme/t", v2), StoreEvent("acme/t", None)]
    assert all(e.task != "old" for e in events) and store.current("old") == before
    store.close()


def test_the_event_arrives_within_a_second_of_the_write(tmp_path):
    store = LocalStore(tmp_path)
    events = []
    store.subscribe(events.append)
    version = other_process(tmp_path, "put", "t", "x")
    written = time.monotonic()  # the writer has exited: its put is done
    assert wait_for(lambda: events == [StoreEvent("t", version)], timeout=1.0), events
    assert time.monotonic() - written < 1.0
    store.close()


def test_this_processs_own_writes_are_reported_once(tmp_path):
    store = LocalStore(tmp_path)
    events = []
    store.subscribe(events.append)
    versions = [store.put("t", bytes([i]), "prompt") for i in range(5)]
    store.delete("t")
    time.sleep(0.8)  # several watcher polls
    assert events == [StoreEvent("t", v) for v in versions] + [StoreEvent("t", None)]
    store.close()
