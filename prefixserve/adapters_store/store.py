"""The adapter store interface: tasks point at immutable, content-addressed artifact versions.

A store holds bytes only; callers validate artifacts (`decode_artifact`) before `put`. Every
change (put, rollback, delete) is published as a `StoreEvent` to subscribers, which is how every
engine replica learns that a task has a new version (hot swap).

Retention: each task's history keeps its newest `max_history` entries; a blob is referenced while any
task's history holds its version (two tasks may hold the same bytes) or an entry that requires it (an
intrinsic artifact requires the subspace it is decoded through: `put(..., requires=...)`). A blob that
stops being referenced (its entry falls out of a history, or its task is deleted) is recorded as an
orphan with the time, and `collect_garbage` deletes it once it has stayed unreferenced for `gc_grace_s`: a
request that pinned the version at arrival, on any replica, still finds the bytes when it fetches
them later. Stores collect opportunistically on every change, so no extra process is needed."""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from prefixserve.errors import ConfigError, InvalidRequestError, TaskNotFoundError

DEFAULT_MAX_HISTORY = 8  # entries a task retains (its rollback targets); what falls out is collected
# An orphan blob outlives this. It must exceed the longest a request may take from pinning a version to
# fetching it (the server's request limit, 600 s by default, includes the wait for a slot) plus event lag.
DEFAULT_GC_GRACE_S = 1800.0
MAX_TASK_NAME_CHARS = 256
# A version's card (what made it: a training job's kind, data size, metrics vs baselines) is kept in every
# history entry of the version, so it is bounded like the rest of the record.
MAX_CARD_BYTES = 64 * 1024
_VERSION_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VersionRecord:
    """One entry of a task's history, newest first."""

    version: str  # sha256 hex of the artifact bytes
    kind: str
    num_bytes: int
    created_at: float  # unix time of the put (or rollback) that made it current
    requires: tuple[str, ...] = ()  # versions this one needs to be served (sorted); referenced like it
    card: dict | None = field(default=None, hash=False)  # JSON object describing how the version was made

    def to_json(self) -> dict:
        """The record as stored; `requires` and `card` only when there is one, so other records keep
        their old form."""
        state = asdict(self)
        for name in ("requires", "card"):
            if not state[name]:
                del state[name]
        return state

    @classmethod
    def from_json(cls, state: dict) -> VersionRecord:
        """Inverse of to_json; a record written before `requires` or `card` existed has neither."""
        return cls(**{**state, "requires": tuple(state.get("requires", ()))})

    @property
    def referenced(self) -> tuple[str, ...]:
        """The versions whose blobs this entry keeps: its own and those it requires."""
        return (self.version, *self.requires)


@dataclass(frozen=True)
class StoreEvent:
    task: str
    version: str | None  # the task's new current version; None = the task was deleted


class AdapterStore(abc.ABC):
    """Implementations: LocalStore (a directory, the embedded default) and RedisStore (replicas)."""

    max_history: int  # history entries each task retains
    gc_grace_s: float  # how long a blob stays after its version left the last history that held it

    @abc.abstractmethod
    def put(self, task: str, data: bytes, kind: str, requires: tuple[str, ...] = (),
            card: dict | None = None) -> str:
        """Store the bytes (content-addressed) and make them the task's current version, atomically:
        readers see the old or the new version, never a broken one. Returns the version. The history
        keeps the newest `max_history` entries (`history_after`); versions that fall out become orphans.
        `requires` names stored versions this one cannot be served without (an intrinsic's subspace):
        their blobs are referenced for as long as an entry of this version that requires them is retained,
        whatever happens to their own tasks. `card` (a JSON object of at most MAX_CARD_BYTES, finite
        numbers) is kept with the entry and by rollbacks to it. Putting the version that is already current
        (with the same requires) changes nothing (no history entry, no event, the current card stays).
        InvalidRequestError for an empty or unprintable task name, empty bytes, an empty kind, a malformed
        required version or card; TaskNotFoundError, storing nothing, when a required version has no blob."""

    @abc.abstractmethod
    def current(self, task: str) -> str | None:
        """The task's current version, None if the task does not exist."""

    @abc.abstractmethod
    def get(self, version: str) -> bytes:
        """The artifact bytes of a version; TaskNotFoundError if no such blob (never stored, or collected
        `gc_grace_s` after it left every history), InvalidRequestError if `version` is not a sha256 hex
        digest, StoreCorruptError if the bytes no longer match it."""

    @abc.abstractmethod
    def history(self, task: str) -> list[VersionRecord]:
        """The task's versions, newest first (current first); [] if the task does not exist."""

    @abc.abstractmethod
    def list_tasks(self, prefix: str = "") -> dict[str, str]:
        """task -> current version, for tasks whose name starts with prefix."""

    @abc.abstractmethod
    def histories(self, prefix: str = "") -> dict[str, list[VersionRecord]]:
        """task -> history (newest first), for tasks whose name starts with prefix."""

    def retained_bytes(self, prefix: str = "") -> int:
        """What the tasks whose name starts with prefix keep in the store: the bytes of the distinct
        versions their histories retain (old versions count until they fall out of the history or the
        task is deleted; bytes two of these tasks share count once)."""
        return sum(retained_versions(self.histories(prefix).values()).values())

    @abc.abstractmethod
    def rollback(self, task: str, version: str | None = None) -> str:
        """Make an earlier version current again and return it. Default: the newest history entry that
        differs from the current version. The history gains a new entry for it, so history[0] is always
        current. TaskNotFoundError for an unknown task or a version not in its (capped) history;
        InvalidRequestError when there is no earlier version."""

    @abc.abstractmethod
    def delete(self, task: str) -> None:
        """Remove the task and its history; its versions and those they require become orphans (their
        blobs stay for `gc_grace_s`, or for as long as another task's history holds or requires them), and
        subscribers get StoreEvent(task, None). TaskNotFoundError for an unknown task."""

    @abc.abstractmethod
    def collect_garbage(self, now: float | None = None) -> int:
        """Delete the blobs that no task's history references and that have been orphans for at least
        `gc_grace_s` as of `now` (unix time; default: the present). Atomic against every client's puts:
        a version put again meanwhile is referenced and kept. Returns the number of blobs deleted.
        put, rollback and delete call it too, so a store stays bounded without anyone calling it."""

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


def check_retention(max_history: object, gc_grace_s: object) -> tuple[int, float]:
    """The constructor arguments every store takes; ConfigError unless sensible."""
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ConfigError(f"expected max_history to be a positive number of history entries, found {max_history!r}")
    if isinstance(gc_grace_s, bool) or not isinstance(gc_grace_s, int | float) or not 0 <= gc_grace_s < float("inf"):
        raise ConfigError(f"expected gc_grace_s to be a finite number of seconds >= 0, found {gc_grace_s!r}")
    return max_history, float(gc_grace_s)


def history_after(record: VersionRecord, history: list[VersionRecord], max_history: int) -> list[VersionRecord]:
    """A task's history once `record` is made current: it, then the newest max_history - 1 older entries.
    Shared by both stores and the quota check, so what a quota counts is what a store keeps."""
    return [record, *history[:max_history - 1]]


def retained_versions(histories: Iterable[list[VersionRecord]]) -> dict[str, int]:
    """version -> num_bytes of the distinct versions these histories hold."""
    return {record.version: record.num_bytes for history in histories for record in history}


def referenced_versions(history: Iterable[VersionRecord]) -> set[str]:
    """The versions whose blobs a task's history keeps: its entries' versions and what they require."""
    return {version for record in history for version in record.referenced}


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


def check_put_args(task: object, data: object, kind: object, requires: object = (),
                   card: object = None) -> tuple[bytes, tuple[str, ...]]:
    """(the bytes, the required versions sorted and without duplicates) of a valid put."""
    check_task_name(task)
    if not isinstance(kind, str) or not kind:
        raise InvalidRequestError(f"expected a non-empty kind name, found {kind!r:.80}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequestError(f"expected artifact bytes, found {type(data).__name__}")
    if len(data) == 0:
        raise InvalidRequestError("expected non-empty artifact bytes, found 0 bytes")
    if not isinstance(requires, tuple | list):  # a bare version string would read as 64 one-character ones
        raise InvalidRequestError(f"expected requires to be a tuple of versions, found {type(requires).__name__}")
    if card is not None:
        check_card(card)
    return bytes(data), tuple(sorted({check_version(version) for version in requires}))


def check_card(card: object) -> None:
    """InvalidRequestError unless `card` is a JSON object of at most MAX_CARD_BYTES with finite numbers."""
    if not isinstance(card, dict):
        raise InvalidRequestError(f"expected the card to be a JSON object, found {type(card).__name__}")
    try:  # allow_nan=False: a NaN metric would be written as invalid JSON that other readers refuse
        size = len(json.dumps(card, allow_nan=False).encode())
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"expected the card to hold JSON values with finite numbers, found: {e}") from None
    if size > MAX_CARD_BYTES:
        raise InvalidRequestError(f"expected a card of at most {MAX_CARD_BYTES} bytes as JSON, found {size}")


def missing_requirement_error(task: str, missing: list[str]) -> TaskNotFoundError:
    """The error of a put whose required versions have no blob (never stored, or collected)."""
    return TaskNotFoundError(f"expected the versions task {task!r} requires to be stored, found no blob for "
                             f"{', '.join(missing)}; store them first (nothing was stored)")


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
