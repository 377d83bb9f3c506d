"""Which version each task serves. Pointers are written by uploads, rollbacks and deletes through
this replica, and by the store's events for changes through any other; every thread may read them.
A version a pointer no longer names is handed to the engine thread (`drain_stale`) to be freed
once no request holds it."""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Iterator

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.adapters_store.store import AdapterStore, StoreEvent
from prefixserve.errors import InvalidRequestError, PrefixServeError, TaskNotFoundError

log = logging.getLogger(__name__)

BASE_TASK = "base"
MAX_TASK_NAME_CHARS = 200  # of the engine's "<tenant>/<task>"
TASK_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]*$"  # what a tenant may call a task (the engine adds "<tenant>/")
_TASK_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:/-]{{0,{MAX_TASK_NAME_CHARS - 1}}}$")
NOT_SERVABLE = ("task {task!r} holds data other tasks use (an IPT subspace is a shared decoder), not servable "
                "itself; serve a task that points at it")


def check_task_name(task: str) -> None:
    if task == BASE_TASK or not _TASK_NAME.match(task):
        raise InvalidRequestError(f"task names are 1-200 characters of letters, digits and ._:/- (not "
                                  f"{BASE_TASK!r}), found {task!r}")


class TaskPointers:
    def __init__(self, store: AdapterStore):
        self.store = store
        self._tasks: dict[str, str] = {}  # task -> current version; written by the engine and store threads
        # Serialises pointer writes (and the store calls they follow) across the engine, store-event
        # and caller threads, so a late event can never resurrect a pointer a delete just removed.
        self._lock = threading.Lock()
        self._stale: queue.SimpleQueue[str] = queue.SimpleQueue()  # versions that may have lost their task
        self.not_servable: set[str] = set()  # versions of kinds that are no task (subspaces): refused
        self._unsubscribe = store.subscribe(self._on_store_event)

    def close(self) -> None:
        self._unsubscribe()

    def resolve(self, task: str | None) -> str | None:
        """The version a new request of `task` pins (None: the plain backbone)."""
        if task is None or task == BASE_TASK:
            return None
        version = self._tasks.get(task)
        if version is None:
            with self._lock:
                version = self._tasks.get(task) or self.store.current(task)
                if version is None:
                    raise TaskNotFoundError(f"task {task!r} is not registered")
                self._tasks[task] = version
        if version in self.not_servable:
            raise InvalidRequestError(NOT_SERVABLE.format(task=task))
        return version

    def tasks(self) -> dict[str, str]:
        return dict(self._tasks)

    def knows(self, task: str) -> bool:
        """Whether `task` has a current version here: registered, or resolved by a request, and not
        deleted since (a deletion on any replica reaches this one through the store's events)."""
        return task in self._tasks

    def is_current(self, version: str) -> bool:
        return version in self._tasks.values()

    def publish(self, task: str, artifact: Artifact, data: bytes) -> None:
        """Write an upload to the store and point `task` at it. The version it replaces, or this one
        if the write fails, becomes stale."""
        kind = get_kind(artifact.kind)
        try:
            with self._lock:
                self.store.put(task, data, artifact.kind, requires=kind.requires(artifact.config))
                previous = self._tasks.get(task)
                self._tasks[task] = artifact.version
        except BaseException:
            self._stale.put(artifact.version)  # compiled for nothing unless a task points at it
            raise
        if not kind.servable:
            self.not_servable.add(artifact.version)
        if previous is not None and previous != artifact.version:
            self._stale.put(previous)

    def unregister(self, task: str) -> None:
        with self._lock:
            if self.store.current(task) is None:
                raise TaskNotFoundError(f"task {task!r} is not registered")
            self.store.delete(task)
            previous = self._tasks.pop(task, None)
        if previous is not None:
            self._stale.put(previous)

    def rollback(self, task: str, version: str | None = None) -> str:
        """Make an earlier version (the previous one by default) current; returns it."""
        with self._lock:
            target = self.store.rollback(task, version)
            previous = self._tasks.get(task)
            self._tasks[task] = target
        if previous is not None and previous != target:
            self._stale.put(previous)
        return target

    def mark_stale(self, version: str) -> None:
        self._stale.put(version)

    def drain_stale(self) -> Iterator[str]:
        while not self._stale.empty():
            yield self._stale.get()

    def _on_store_event(self, event: StoreEvent) -> None:
        # Runs on the store's thread. Re-read the pointer rather than trusting the event's version:
        # events of rapid uploads may arrive after a later one was read, and the store is the truth.
        with self._lock:
            try:
                current = self.store.current(event.task)
            except PrefixServeError:
                log.warning("store unreachable while handling an event for task %r", event.task)
                return
            previous = self._tasks.get(event.task)
            if current is None:
                self._tasks.pop(event.task, None)
            else:
                self._tasks[event.task] = current
        if previous is not None and previous != current:
            self._stale.put(previous)  # freed on the engine thread
