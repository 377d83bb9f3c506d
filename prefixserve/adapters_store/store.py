"""The adapter store interface: tasks point at immutable, content-addressed artifact versions.

A store holds bytes only; callers validate artifacts (`decode_artifact`) before `put`. Every
change (put, rollback, delete) is published as a `StoreEvent` to subscribers, which is how every
engine replica learns that a task has a new version (hot swap)."""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from prefixserve.errors import InvalidRequestError, TaskNotFoundError

MAX_HISTORY = 32  # entries kept per task; older versions' blobs stay (no GC yet)
MAX_TASK_NAME_CHARS = 256
_VERSION_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VersionRecord:
    """One entry of a task's history, newest first."""

    version: str  # sha256 hex of the artifact bytes
    kind: str
    num_bytes: int
    created_at: float  # unix time of the put (or rollback) that made it current


@dataclass(frozen=True)
class StoreEvent:
    task: str
    version: str | None  # the task's new current version; None = the task was deleted


class AdapterStore(abc.ABC):
    """Implementations: LocalStore (a directory, the embedded default) and RedisStore (replicas)."""

    @abc.abstractmethod
    def put(self, task: str, data: bytes, kind: str) -> str:
        """Store the bytes (content-addressed) and make them the task's current version, atomically:
        readers see the old or the new version, never a broken one. Returns the version.
        Putting the version that is already current changes nothing (no history entry, no event).
        InvalidRequestError for an empty or unprintable task name, empty bytes or an empty kind."""

    @abc.abstractmethod
    def current(self, task: str) -> str | None:
        """The task's current version, None if the task does not exist."""

    @abc.abstractmethod
    def get(self, version: str) -> bytes:
        """The artifact bytes of a version; TaskNotFoundError if no such blob, InvalidRequestError if
        `version` is not a sha256 hex digest, StoreCorruptError if the bytes no longer match it."""

    @abc.abstractmethod
    def history(self, task: str) -> list[VersionRecord]:
        """The task's versions, newest first (current first); [] if the task does not exist."""

    @abc.abstractmethod
    def list_tasks(self, prefix: str = "") -> dict[str, str]:
        """task -> current version, for tasks whose name starts with prefix."""

    @abc.abstractmethod
    def rollback(self, task: str, version: str | None = None) -> str:
        """Make an earlier version current again and return it. Default: the newest history entry that
        differs from the current version. The history gains a new entry for it, so history[0] is always
        current. TaskNotFoundError for an unknown task or a version not in its (capped) history;
        InvalidRequestError when there is no earlier version."""

    @abc.abstractmethod
    def delete(self, task: str) -> None:
        """Remove the task and its history (blobs stay: other tasks or running requests may use them);
        subscribers get StoreEvent(task, None). TaskNotFoundError for an unknown task."""

    @abc.abstractmethod
    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        """Call `callback` for every change made through ANY client of this store (for Redis: any
        process). Returns a function that unsubscribes. Callbacks run on a store-owned thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""


def blob_version(data: bytes) -> str:
    """sha256 hex of the bytes: the same as format.artifact_version, which is not imported here
    because format.py pulls in torch and a store must be cheap to import (CLI, crash-test writer)."""
    return hashlib.sha256(data).hexdigest()


def check_task_name(task: object) -> str:
    if not isinstance(task, str) or not 0 < len(task) <= MAX_TASK_NAME_CHARS or not task.isprintable():
        raise InvalidRequestError(f"expected a task name of 1..{MAX_TASK_NAME_CHARS} printable characters, "
                                  f"found {task!r:.80}")
    return task


def check_version(version: object) -> str:
    """Versions reach file paths and keys: only a lower-case sha256 hex digest is accepted."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise InvalidRequestError(f"expected a version as a 64-character lower-case sha256 hex digest, "
                                  f"found {version!r:.80}")
    return version


def check_put_args(task: object, data: object, kind: object) -> bytes:
    check_task_name(task)
    if not isinstance(kind, str) or not kind:
        raise InvalidRequestError(f"expected a non-empty kind name, found {kind!r:.80}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequestError(f"expected artifact bytes, found {type(data).__name__}")
    if len(data) == 0:
        raise InvalidRequestError("expected non-empty artifact bytes, found 0 bytes")
    return bytes(data)


def rollback_target(task: str, history: list[VersionRecord], version: str | None) -> VersionRecord:
    """The record `rollback` makes current: `version` if the task's history has it, else (None) the
    newest entry that differs from the current version. Shared so both stores agree exactly."""
    if not history:
        raise TaskNotFoundError(f"expected task {task!r} in the store, found no such task")
    if version is None:
        for record in history[1:]:
            if record.version != history[0].version:
                return record
        raise InvalidRequestError(f"expected task {task!r} to have an earlier version to roll back to, "
                                  f"found only {history[0].version}")
    check_version(version)
    for record in history:
        if record.version == version:
            return record
    raise TaskNotFoundError(f"expected version {version} in the history of task {task!r}, "
                            f"found {[r.version[:12] for r in history]}")
