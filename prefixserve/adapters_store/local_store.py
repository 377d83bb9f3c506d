"""LocalStore: the embedded adapter store, one directory.

    blobs/<sha[:2]>/<sha>   artifact bytes, content-addressed, written once
    tasks/<name>.json       {"task": name, "history": [record, ...]}, newest first; history[0] is current
    lock                    flock'ed around every read-modify-write of a task file

Every file is written as temp file + fsync + rename + fsync of the directory, and a blob is durable
before the task file that points at it, so a crash at any point leaves each task at its old or its new
version, never at a missing or partial blob. The flock makes concurrent writers (threads or processes)
serialise on task files; blobs need no lock because equal names mean equal bytes.

Events of this process's changes reach subscribers at once (every LocalStore on the same root shares one
notifier); changes made by other processes on the same directory (a `prefixserve worker` publishing a
trained task, another server) are found by polling the task directory's modification time every
WATCH_INTERVAL_S while anyone is subscribed, so they arrive within a second. Subscribers re-read the
pointer on an event, so a duplicate or late event is harmless. Blobs are never removed: a version that
fell off a history (MAX_HISTORY) or whose task was deleted keeps its blob (no GC yet)."""

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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

from prefixserve.adapters_store.store import (
    MAX_HISTORY,
    AdapterStore,
    StoreEvent,
    VersionRecord,
    blob_version,
    check_put_args,
    check_task_name,
    check_version,
    rollback_target,
)
from prefixserve.errors import StoreCorruptError, TaskNotFoundError

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
    """A store in the directory `root` (created if missing); thread- and process-safe for writers."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self._blobs = self.root / "blobs"
        self._tasks = self.root / "tasks"
        for directory in (self._blobs, self._tasks):
            directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        with _notifiers_lock:
            self._notifier = _notifiers.get(self.root)
            if self._notifier is None:
                self._notifier = _notifiers[self.root] = _Notifier(f"local-store-events:{self.root.name}",
                                                                   self._tasks)
        self._unsubscribes: list[Callable[[], None]] = []

    def put(self, task: str, data: bytes, kind: str) -> str:
        data = check_put_args(task, data, kind)
        version = blob_version(data)
        self._write_blob(version, data)  # before the task file points at it
        with self._locked():
            history = self._read_history(task)
            if history and history[0].version == version:
                return version
            record = VersionRecord(version=version, kind=kind, num_bytes=len(data), created_at=time.time())
            self._write_history(task, [record, *history])
            self._notifier.publish(StoreEvent(task, version))  # under the lock: events keep write order
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
        # Quoting is char by char, so a task starts with prefix iff its quoted name starts with the quoted
        # prefix; hashed names ("#...", long tasks) have to be opened to know.
        quoted_prefix = quote(prefix, safe="")
        tasks = {}
        for path in self._tasks.iterdir():
            name = path.name
            if not name.endswith(".json") or not (name.startswith("#") or name.startswith(quoted_prefix)):
                continue
            try:
                state = _read_json(path)
            except FileNotFoundError:  # deleted since iterdir
                continue
            if state["task"].startswith(prefix) and state["history"]:
                tasks[state["task"]] = state["history"][0]["version"]
        return tasks

    def rollback(self, task: str, version: str | None = None) -> str:
        check_task_name(task)
        with self._locked():
            history = self._read_history(task)
            target = rollback_target(task, history, version)
            record = VersionRecord(target.version, target.kind, target.num_bytes, created_at=time.time())
            self._write_history(task, [record, *history])
            self._notifier.publish(StoreEvent(task, target.version))
        return target.version

    def delete(self, task: str) -> None:
        path = self._task_path(check_task_name(task))
        with self._locked(), self._notifier.own_write(path, task):
            try:
                path.unlink()
            except FileNotFoundError:
                raise TaskNotFoundError(f"expected task {task!r} in the store, found no such task") from None
            _fsync_dir(path.parent)
            self._notifier.publish(StoreEvent(task, None))

    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        unsubscribe = self._notifier.subscribe(callback)
        self._unsubscribes.append(unsubscribe)
        return unsubscribe

    def close(self) -> None:
        """Unsubscribe this instance's callbacks (other instances on the same root keep theirs)."""
        while self._unsubscribes:
            self._unsubscribes.pop()()

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

    def _read_history(self, task: str) -> list[VersionRecord]:
        try:
            state = _read_json(self._task_path(task))
        except FileNotFoundError:
            return []
        return [VersionRecord(**record) for record in state["history"]]

    def _write_history(self, task: str, history: list[VersionRecord]) -> None:
        state = {"task": task, "history": [asdict(record) for record in history[:MAX_HISTORY]]}
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
        for path in [*self._tasks.glob("*.tmp"), *self._blobs.glob("*/*.tmp")]:
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
