"""LocalStore: the embedded adapter store, one directory.

    blobs/<sha[:2]>/<sha>   artifact bytes, content-addressed, written once
    tasks/<name>.json       {"task": name, "history": [record, ...]}, newest first; history[0] is current
    orphans.json            {"orphans": {version: unix time}}: blobs that may have lost their last reference
    lock                    flock'ed around every change (task files, blobs, orphans) and every collection

Every file is written as temp file + fsync + rename + fsync of the directory, and a blob is durable
before the task file that points at it, so a crash at any point leaves each task at its old or its new
version, never at a missing or partial blob. The flock makes concurrent writers (threads or processes)
serialise.

Garbage collection runs under the same flock, so no put can reference a blob while it is being deleted.
A change records the versions it will orphan (and a blob it is about to add) in orphans.json BEFORE it
writes blob and task file: a crash in between leaves a record the collector checks, never an unrecorded
blob. The collector reads every task file (the truth, no index to drift) but only when some record is
older than gc_grace_s, deletes the blobs of those no history references (as an entry's version or as one
an entry requires), and drops their records; one it cannot read makes it delete nothing.

Events of this process's changes reach subscribers at once (every LocalStore on the same root shares one
notifier); changes made by other processes on the same directory (a `prefixserve worker` publishing a
trained task, another server) are found by polling the task directory's modification time every
WATCH_INTERVAL_S while anyone is subscribed, so they arrive within a second. Subscribers re-read the
pointer on an event, so a duplicate or late event is harmless."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from prefixserve.adapters_store.store import (
    DEFAULT_GC_GRACE_S,
    DEFAULT_MAX_HISTORY,
    AdapterStore,
    StoreEvent,
    VersionRecord,
    blob_version,
    check_put_args,
    check_retention,
    check_task_name,
    check_version,
    history_after,
    missing_requirement_error,
    referenced_versions,
    rollback_target,
)
from prefixserve.errors import InvalidRequestError, StoreCorruptError, TaskNotFoundError

_MAX_FILE_NAME_CHARS = 200  # below the usual 255-byte limit, leaving room for ".json" and temp suffixes
_STALE_TEMP_S = 3600.0  # temp files older than this belong to a writer that crashed

logger = logging.getLogger(__name__)

_STOP = object()
WATCH_INTERVAL_S = 0.25


class _TaskDirWatcher:
    """Changes to task files since the last look, found by stat: the directory's mtime moves whenever
    a task file is renamed into place or removed, so an unchanged directory costs one stat."""

    def __init__(self, tasks_dir: Path):
        self._dir = tasks_dir
        self._dir_stamp: int | None = None
        self._files: dict[str, tuple[tuple[int, int, int], str | None]] = {}  # name -> (stat, task)
        self.lock = threading.Lock()  # a scan never sees this process's write half-recorded
        self.changes()  # the baseline: what exists now is not news

    @contextlib.contextmanager
    def own_write(self, path: Path, task: str):
        """Around a write of this process (already published directly): record its result as seen."""
        with self.lock:
            yield
            try:
                st = path.stat()
            except FileNotFoundError:
                self._files.pop(path.name, None)
            else:
                self._files[path.name] = ((st.st_mtime_ns, st.st_size, st.st_ino), task)

    def changes(self) -> list[StoreEvent]:
        with self.lock:
            return self._changes()

    def _changes(self) -> list[StoreEvent]:
        try:
            stamp = self._dir.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if stamp == self._dir_stamp:
            return []
        self._dir_stamp = stamp
        events, seen = [], {}
        for path in self._dir.iterdir():
            if not path.name.endswith(".json"):
                continue
            try:
                st = path.stat()
                key = (st.st_mtime_ns, st.st_size, st.st_ino)
                old = self._files.get(path.name)
                if old is not None and old[0] == key:
                    seen[path.name] = old
                    continue
                state = _read_json(path)
            except (FileNotFoundError, StoreCorruptError):
                continue
            seen[path.name] = (key, state["task"])
            if state["history"]:
                events.append(StoreEvent(state["task"], state["history"][0]["version"]))
        events += [StoreEvent(task, None) for name, (_, task) in self._files.items() if name not in seen and task]
        self._files = seen
        return events


class _Notifier:
    """Delivers events on one daemon thread, started with the first subscriber and stopped with the
    last, so a slow subscriber delays other subscribers but never a writer (publish only enqueues).
    Between events the thread looks for other processes' changes (`watch`)."""

    def __init__(self, thread_name: str, tasks_dir: Path):
        self._tasks_dir = tasks_dir
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[StoreEvent], None]] = {}
        self._queue: queue.SimpleQueue | None = None  # one queue per thread, so a stale _STOP never hits a new one
        self._thread: threading.Thread | None = None
        self._watcher: _TaskDirWatcher | None = None
        self._next_id = 0

    @contextlib.contextmanager
    def own_write(self, path: Path, task: str):
        """Wrap a task file write of this process so the watcher does not report it a second time."""
        with self._lock:
            watcher = self._watcher
        if watcher is None:
            yield
        else:
            with watcher.own_write(path, task):
                yield

    def publish(self, event: StoreEvent) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.put(event)

    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        with self._lock:
            subscription_id, self._next_id = self._next_id, self._next_id + 1
            self._callbacks[subscription_id] = callback
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._watcher = watcher = _TaskDirWatcher(self._tasks_dir)  # the baseline, before we return
                self._thread = threading.Thread(target=self._run, args=(self._queue, watcher),
                                                name=self._thread_name, daemon=True)
                self._thread.start()

        def unsubscribe() -> None:
            thread = None
            with self._lock:
                if self._callbacks.pop(subscription_id, None) is not None and not self._callbacks:
                    self._queue.put(_STOP)
                    self._queue, thread, self._thread, self._watcher = None, self._thread, None, None
            # Join outside the lock (the thread takes it): a thread still running at interpreter exit
            # can abort the process while native libraries are being torn down.
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
        return unsubscribe

    def _run(self, events: queue.SimpleQueue, watcher: _TaskDirWatcher) -> None:
        while True:
            try:
                batch = [events.get(timeout=WATCH_INTERVAL_S)]
            except queue.Empty:
                try:
                    batch = watcher.changes()
                except OSError:
                    logger.exception("watching %s for other processes' changes failed", self._tasks_dir)
                    batch = []
            if _STOP in batch:
                return
            with self._lock:
                callbacks = list(self._callbacks.values())
            for event in batch:
                for callback in callbacks:
                    try:
                        callback(event)
                    except Exception:  # one broken subscriber must not silence the others
                        logger.exception("store event subscriber %r failed on %s", callback, event)


# One notifier per store root in this process: a server and an in-process trainer holding two LocalStores
# on the same directory see each other's changes. Weak: it goes away with the last store on that root.
_notifiers: weakref.WeakValueDictionary[Path, _Notifier] = weakref.WeakValueDictionary()
_notifiers_lock = threading.Lock()


class LocalStore(AdapterStore):
    """A store in the directory `root` (created if missing); thread- and process-safe for writers.
    Every client of one directory should use the same `max_history` and `gc_grace_s`."""

    def __init__(self, root: Path, *, max_history: int = DEFAULT_MAX_HISTORY,
                 gc_grace_s: float = DEFAULT_GC_GRACE_S):
        self.max_history, self.gc_grace_s = check_retention(max_history, gc_grace_s)
        self.root = Path(root).expanduser().resolve()
        self._blobs = self.root / "blobs"
        self._tasks = self.root / "tasks"
        self._orphans = self.root / "orphans.json"
        for directory in (self._blobs, self._tasks):
            directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        with _notifiers_lock:
            self._notifier = _notifiers.get(self.root)
            if self._notifier is None:
                self._notifier = _notifiers[self.root] = _Notifier(f"local-store-events:{self.root.name}",
                                                                   self._tasks)
        self._unsubscribes: list[Callable[[], None]] = []

    def put(self, task: str, data: bytes, kind: str, requires: tuple[str, ...] = (),
            card: dict | None = None) -> str:
        data, requires = check_put_args(task, data, kind, requires, card)
        version = blob_version(data)
        with self._locked():  # the collector takes it too: a required blob found here stays until we commit
            missing = [required for required in requires if not self._blob_path(required).exists()]
            if missing:
                raise missing_requirement_error(task, missing)
            history = self._read_history(task)
            if history and history[0].version == version and history[0].requires == requires:
                self._write_blob(version, data)  # a damaged blob is rewritten by a re-put
                return version
            now = time.time()
            record = VersionRecord(version=version, kind=kind, num_bytes=len(data), created_at=now, requires=requires,
                                   card=card)
            new_history = history_after(record, history, self.max_history)
            new_blob = [] if self._blob_path(version).exists() else [version]
            orphaned = referenced_versions(history) - referenced_versions(new_history)
            orphans = self._record_orphans(orphaned | set(new_blob), now)
            self._write_blob(version, data)  # before the task file points at it
            self._write_history(task, new_history)
            self._notifier.publish(StoreEvent(task, version))  # under the lock: events keep write order
            self._collect_opportunistically(orphans)
        return version

    def current(self, task: str) -> str | None:
        history = self._read_history(check_task_name(task))
        return history[0].version if history else None

    def get(self, version: str) -> bytes:
        path = self._blob_path(check_version(version))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TaskNotFoundError(f"expected artifact version {version} in {self._blobs}, "
                                    "found no such blob") from None
        found = blob_version(data)
        if found != version:
            raise StoreCorruptError(f"expected blob {path} to hash to its version {version}, found {found}")
        return data

    def history(self, task: str) -> list[VersionRecord]:
        return self._read_history(check_task_name(task))

    def list_tasks(self, prefix: str = "") -> dict[str, str]:
        return {state["task"]: state["history"][0]["version"] for state in self._task_states(prefix)}

    def histories(self, prefix: str = "") -> dict[str, list[VersionRecord]]:
        return {state["task"]: [VersionRecord.from_json(r) for r in state["history"]]
                for state in self._task_states(prefix)}

    def rollback(self, task: str, version: str | None = None) -> str:
        check_task_name(task)
        with self._locked():
            history = self._read_history(task)
            target = rollback_target(task, history, version)
            now = time.time()
            new_history = history_after(replace(target, created_at=now), history, self.max_history)  # keeps requires
            orphans = self._record_orphans(referenced_versions(history) - referenced_versions(new_history), now)
            self._write_history(task, new_history)
            self._notifier.publish(StoreEvent(task, target.version))
            self._collect_opportunistically(orphans)
        return target.version

    def delete(self, task: str) -> None:
        path = self._task_path(check_task_name(task))
        with self._locked(), self._notifier.own_write(path, task):
            try:
                orphaned = referenced_versions(self._read_history(task))
                if not orphaned:
                    raise TaskNotFoundError(f"expected task {task!r} in the store, found no such task")
            except StoreCorruptError:  # its versions cannot be known: they leak rather than risk a loss
                logger.exception("deleting task %r whose file is unreadable", task)
                orphaned = set()
            orphans = self._record_orphans(orphaned, time.time())
            path.unlink()
            _fsync_dir(path.parent)
            self._notifier.publish(StoreEvent(task, None))
            self._collect_opportunistically(orphans)

    def collect_garbage(self, now: float | None = None) -> int:
        with self._locked():
            return self._collect(self._read_orphans(), time.time() if now is None else now)

    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        unsubscribe = self._notifier.subscribe(callback)
        self._unsubscribes.append(unsubscribe)
        return unsubscribe

    def close(self) -> None:
        """Unsubscribe this instance's callbacks (other instances on the same root keep theirs)."""
        while self._unsubscribes:
            self._unsubscribes.pop()()

    # --- garbage collection (callers hold the lock) ---

    def _record_orphans(self, versions: set[str], now: float) -> dict[str, float]:
        """Mark `versions` as orphaned at `now` (a later time wins: the grace restarts); returns all records."""
        orphans = self._read_orphans()
        if versions:
            orphans.update((version, max(now, orphans.get(version, now))) for version in versions)
            _write_atomic(self._orphans, json.dumps({"orphans": orphans}).encode())
        return orphans

    def _collect(self, orphans: dict[str, float], now: float) -> int:
        cutoff = now - self.gc_grace_s
        expired = [version for version, orphaned_at in orphans.items() if orphaned_at <= cutoff]
        if not expired:
            return 0  # the common case costs one small file read
        referenced = set()
        for state in self._task_states():
            referenced |= referenced_versions(VersionRecord.from_json(record) for record in state["history"])
        num_deleted, touched = 0, set()
        for version in expired:
            del orphans[version]  # referenced again: a new record comes when it next leaves a history
            if version not in referenced:
                with contextlib.suppress(FileNotFoundError):  # gone already (a crash after the unlink)
                    self._blob_path(version).unlink()
                    num_deleted += 1
                    touched.add(self._blob_path(version).parent)
        for directory in touched:  # the unlinks are durable before their records go
            _fsync_dir(directory)
        _write_atomic(self._orphans, json.dumps({"orphans": orphans}).encode())
        return num_deleted

    def _collect_opportunistically(self, orphans: dict[str, float]) -> None:
        # The change has committed: a failed collection must not fail it (the records stay for a later one).
        try:
            self._collect(orphans, time.time())
        except (OSError, StoreCorruptError):
            logger.exception("collecting garbage in %s failed; the orphan blobs stay for a later collection", self.root)

    def _read_orphans(self) -> dict[str, float]:
        try:
            state = json.loads(self._orphans.read_bytes())
            orphans = state["orphans"]
            if isinstance(orphans, dict) and all(isinstance(t, int | float) for t in orphans.values()):
                return {check_version(v): float(t) for v, t in orphans.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError, InvalidRequestError):
            pass
        # Losing the records leaks their blobs; it can never delete a referenced one.
        logger.warning("expected orphan records in %s, found them unreadable; starting afresh", self._orphans)
        return {}

    # --- files ---

    def _blob_path(self, version: str) -> Path:
        return self._blobs / version[:2] / version

    def _task_path(self, task: str) -> Path:
        # Percent-quoting keeps "/" and ":" out of file names and is injective; names too long for a file
        # name are hashed instead ("#" never appears in quoted names). The task name lives in the file.
        quoted = quote(task, safe="")
        name = quoted if len(quoted) <= _MAX_FILE_NAME_CHARS else "#" + blob_version(task.encode())
        return self._tasks / f"{name}.json"

    def _write_blob(self, version: str, data: bytes) -> None:
        path = self._blob_path(version)
        with contextlib.suppress(FileNotFoundError):
            if blob_version(path.read_bytes()) == version:
                return  # idempotent re-put; a damaged blob (StoreCorruptError on get) is rewritten instead
        if not path.parent.exists():
            path.parent.mkdir(exist_ok=True)
            _fsync_dir(self._blobs)
        _write_atomic(path, data)

    def _task_states(self, prefix: str = "") -> Iterator[dict]:
        """The task files of tasks whose name starts with prefix (and a non-empty history)."""
        # Quoting is char by char, so a task starts with prefix iff its quoted name starts with the quoted
        # prefix; hashed names ("#...", long tasks) have to be opened to know.
        quoted_prefix = quote(prefix, safe="")
        for path in self._tasks.iterdir():
            name = path.name
            if not name.endswith(".json") or not (name.startswith("#") or name.startswith(quoted_prefix)):
                continue
            try:
                state = _read_json(path)
            except FileNotFoundError:  # deleted since iterdir
                continue
            if state["task"].startswith(prefix) and state["history"]:
                yield state

    def _read_history(self, task: str) -> list[VersionRecord]:
        try:
            state = _read_json(self._task_path(task))
        except FileNotFoundError:
            return []
        return [VersionRecord.from_json(record) for record in state["history"]]

    def _write_history(self, task: str, history: list[VersionRecord]) -> None:
        state = {"task": task, "history": [record.to_json() for record in history]}
        path = self._task_path(task)
        with self._notifier.own_write(path, task):
            _write_atomic(path, json.dumps(state, indent=1).encode())

    @contextlib.contextmanager
    def _locked(self):
        # flock belongs to the open file description: it excludes other threads (each opens its own)
        # and other processes alike, and the kernel drops it when a holder dies.
        with open(self.root / "lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            yield

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_S
        for path in [*self._tasks.glob("*.tmp"), *self._blobs.glob("*/*.tmp"), *self.root.glob("orphans.json.*.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _read_json(path: Path) -> dict:
    text = path.read_bytes()
    try:
        state = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreCorruptError(f"expected a JSON task record in {path}, found invalid JSON ({e})") from None
    if not isinstance(state, dict) or not {"task", "history"} <= set(state):
        raise StoreCorruptError(f"expected a task record with task and history in {path}, found {text[:80]!r}")
    return state


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (and a crash) see the old file or the new one: the rename is atomic, and the fsyncs
    order the data before the name and make the name durable."""
    temp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
