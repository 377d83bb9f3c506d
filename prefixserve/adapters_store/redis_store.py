"""RedisStore: the adapter store shared by many replicas.

Keys (ns = namespace):
    {ns}:blob:{version}   artifact bytes, written once (SET NX)
    {ns}:history:{task}   list of JSON VersionRecords, newest first, capped at max_history; head = current
    {ns}:tasks            set of task names (list_tasks SSCANs it; never KEYS)
    {ns}:refs:{version}   set of the tasks whose history holds the version or an entry requiring it; none = unreferenced
    {ns}:orphans          sorted set of versions that may be unreferenced, scored by when they became so
    {ns}:refs-built       present once refs:* covers every history (stores made before GC had none)
    {ns}:events           pub/sub channel of JSON StoreEvents

A put writes the blob first, then changes history, task set, refs, orphans and PUBLISH in one MULTI/EXEC
under WATCH of the history key, so readers see the old or the new version and an event is published
exactly when the change commits. A change adds the task to refs:{v} of each version its history gains and
removes it (and scores v in orphans) for each it loses, where a history holds its entries' versions and the
versions they require; members are task names, so two clients changing different tasks never conflict and
the sets stay exact. A put also scores its version in orphans before writing the blob (a crash before the
transaction leaves a collectable blob), and watches the blob key: if the collector deleted it after the
SET NX, the transaction aborts and the retry writes the blob with it. It watches the blobs it requires too,
having found them present under the watch, so one collected meanwhile aborts it and the retry refuses.
The collector is one Lua script (atomic): an orphan scored at least gc_grace_s ago whose refs:{v} is
empty loses its blob; every expired orphan loses its record (a referenced one is scored again when it
next leaves a history). Scores are each client's clock: keep replicas' clocks within a fraction of it.

Every Redis failure surfaces as StoreUnavailableError (503) naming the URL and the operation, after at
most one quick retry: a replica keeps serving the tasks it already holds."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry

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
from prefixserve.errors import ConfigError, StoreCorruptError, StoreUnavailableError, TaskNotFoundError

logger = logging.getLogger(__name__)

_MAX_WATCH_ATTEMPTS = 50  # optimistic transactions on one task; contention is a few writers at most
_MIN_BACKOFF_S, _MAX_BACKOFF_S = 0.05, 2.0  # listener reconnects
_HEALTH_CHECK_S = 5  # PING an idle pub/sub connection this often, so a silently dead peer is noticed
_GC_BATCH = 256  # orphans one collector call looks at; the rest wait for the next call

# KEYS[1] orphans; ARGV: cutoff time, batch size, key prefix ("{ns}:"). Returns {orphans looked at,
# blobs deleted}. It reaches refs and blob keys by name, which standalone Redis allows (not Cluster).
_COLLECT_LUA = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local num_deleted = 0
for _, version in ipairs(expired) do
    redis.call('ZREM', KEYS[1], version)
    if redis.call('EXISTS', ARGV[3] .. 'refs:' .. version) == 0 then
        num_deleted = num_deleted + redis.call('DEL', ARGV[3] .. 'blob:' .. version)
    end
end
return {#expired, num_deleted}
"""


class RedisStore(AdapterStore):
    """`url` as redis-py takes it (redis://[:password@]host:port/db, rediss:// for TLS); `namespace`
    prefixes every key and the event channel, so stores of different deployments share one Redis;
    `socket_timeout` bounds every command and connect (an outage costs a caller about twice that)."""

    def __init__(self, url: str, *, namespace: str = "prefixserve", socket_timeout: float = 2.0,
                 max_history: int = DEFAULT_MAX_HISTORY, gc_grace_s: float = DEFAULT_GC_GRACE_S):
        if not namespace or not isinstance(namespace, str):
            raise ConfigError(f"expected a non-empty Redis namespace, found {namespace!r}")
        self.max_history, self.gc_grace_s = check_retention(max_history, gc_grace_s)
        self.url = redact_url(url)
        self.namespace = namespace
        self.channel = f"{namespace}:events"
        self._tasks_key = f"{namespace}:tasks"
        self._orphans_key = f"{namespace}:orphans"
        self._refs_built_key = f"{namespace}:refs-built"
        self._refs_built = False  # known here to be built: checked once per client, before its first collection
        try:
            self._client = redis.Redis.from_url(url, **client_options(socket_timeout, retries=1))
        except ValueError as e:
            raise ConfigError(f"expected a redis:// or rediss:// URL, found {self.url!r} ({e})") from None
        self._collect_script = self._client.register_script(_COLLECT_LUA)
        self._events = _EventListener(url, self.channel, socket_timeout, snapshot=self.list_tasks)

    def put(self, task: str, data: bytes, kind: str, requires: tuple[str, ...] = (),
            card: dict | None = None) -> str:
        data, requires = check_put_args(task, data, kind, requires, card)
        version = blob_version(data)
        record = VersionRecord(version=version, kind=kind, num_bytes=len(data), created_at=time.time(),
                               requires=requires, card=card)
        required_keys = tuple(self._blob_key(required) for required in requires)

        def change(pipe) -> tuple[str, Callable | None]:
            self._check_required(pipe, task, requires)  # under the watch of their blob keys
            history = self._read_history(pipe, task)
            if history and history[0].version == version and history[0].requires == requires:
                return version, None  # already current: idempotent, no entry and no event
            blob_missing = not pipe.exists(self._blob_key(version))

            def write(pipe) -> None:
                if blob_missing:  # collected since _write_blob: the watch makes this the only writer now
                    pipe.set(self._blob_key(version), data)
                self._replace_history(pipe, task, history, history_after(record, history, self.max_history))
            return version, write

        with self._failures_as_unavailable("put"):
            self._check_required(self._client, task, requires)  # a refused put writes no blob either
            self._write_blob(version, data)  # before anything points at it
            result = self._transaction(task, "put", change, also_watch=(self._blob_key(version), *required_keys))
        self._collect_opportunistically()
        return result

    def current(self, task: str) -> str | None:
        with self._failures_as_unavailable("current"):
            head = self._client.lindex(self._history_key(check_task_name(task)), 0)
        return None if head is None else json.loads(head)["version"]

    def get(self, version: str) -> bytes:
        with self._failures_as_unavailable("get"):
            data = self._client.get(self._blob_key(check_version(version)))
        if data is None:
            raise TaskNotFoundError(f"expected artifact version {version} in Redis store {self.url} "
                                    f"(namespace {self.namespace!r}), found no such blob")
        found = blob_version(data)
        if found != version:
            raise StoreCorruptError(f"expected blob {self._blob_key(version)} at {self.url} to hash to its "
                                    f"version, found {found}")
        return data

    def history(self, task: str) -> list[VersionRecord]:
        with self._failures_as_unavailable("history"):
            return self._read_history(self._client, check_task_name(task))

    def list_tasks(self, prefix: str = "") -> dict[str, str]:
        with self._failures_as_unavailable("list_tasks"):
            names = self._task_names(prefix)
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lindex(self._history_key(name), 0)
                heads = pipe.execute()
        # a task deleted between SSCAN and LINDEX has no head
        return {name: json.loads(head)["version"] for name, head in zip(names, heads) if head is not None}

    def histories(self, prefix: str = "") -> dict[str, list[VersionRecord]]:
        with self._failures_as_unavailable("histories"):
            names = self._task_names(prefix)
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lrange(self._history_key(name), 0, -1)
                entries = pipe.execute()
        return {name: [VersionRecord.from_json(json.loads(e)) for e in history]
                for name, history in zip(names, entries) if history}

    def rollback(self, task: str, version: str | None = None) -> str:
        check_task_name(task)

        def change(pipe) -> tuple[str, Callable | None]:
            history = self._read_history(pipe, task)
            target = rollback_target(task, history, version)
            record = replace(target, created_at=time.time())  # keeps what it requires
            new_history = history_after(record, history, self.max_history)
            return target.version, lambda pipe: self._replace_history(pipe, task, history, new_history)

        with self._failures_as_unavailable("rollback"):
            result = self._transaction(task, "rollback", change)
        self._collect_opportunistically()
        return result

    def delete(self, task: str) -> None:
        check_task_name(task)

        def change(pipe) -> tuple[None, Callable]:
            history = self._read_history(pipe, task)
            if not history:
                raise TaskNotFoundError(f"expected task {task!r} in Redis store {self.url} "
                                        f"(namespace {self.namespace!r}), found no such task")
            return None, lambda pipe: self._replace_history(pipe, task, history, [])

        with self._failures_as_unavailable("delete"):
            self._transaction(task, "delete", change)
        self._collect_opportunistically()

    def collect_garbage(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.gc_grace_s
        with self._failures_as_unavailable("collect_garbage"):
            if not self._refs_built:
                self._build_refs()
            num_deleted, num_seen = 0, _GC_BATCH
            while num_seen == _GC_BATCH:  # a full batch: there may be more
                num_seen, batch_deleted = self._collect_script(
                    keys=[self._orphans_key], args=[repr(cutoff), _GC_BATCH, f"{self.namespace}:"], client=self._client)
                num_deleted += batch_deleted
            return num_deleted

    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        """Callbacks run on this store's one listener thread, inline: keep them short."""
        return self._events.subscribe(callback)

    @property
    def events_connected(self) -> bool:
        """Whether the listener is subscribed right now (False before the first subscribe)."""
        return self._events.connected

    def close(self) -> None:
        self._events.close()
        self._client.close()

    # --- internals ---

    def _blob_key(self, version: str) -> str:
        return f"{self.namespace}:blob:{version}"

    def _history_key(self, task: str) -> str:
        return f"{self.namespace}:history:{task}"

    def _refs_key(self, version: str) -> str:
        return f"{self.namespace}:refs:{version}"

    def _task_names(self, prefix: str) -> list[str]:
        # Filter in Python rather than with SSCAN MATCH: task names may hold glob characters.
        names = [name.decode() for name in self._client.sscan_iter(self._tasks_key, count=1000)]
        return [name for name in names if name.startswith(prefix)]

    def _read_history(self, client, task: str) -> list[VersionRecord]:
        return [VersionRecord.from_json(json.loads(e)) for e in client.lrange(self._history_key(task), 0, -1)]

    def _check_required(self, client, task: str, requires: tuple[str, ...]) -> None:
        if requires:
            found = client.exists(*(self._blob_key(required) for required in requires)) == len(requires)
            if not found:  # the rare refusal: name which ones
                raise missing_requirement_error(task, [r for r in requires if not client.exists(self._blob_key(r))])

    def _write_blob(self, version: str, data: bytes) -> None:
        key = self._blob_key(version)
        with self._client.pipeline(transaction=False) as pipe:
            # Recorded first: if this client dies before its transaction, the blob is still collected.
            pipe.zadd(self._orphans_key, {version: time.time()}, gt=True)
            pipe.set(key, data, nx=True)
            _, written = pipe.execute()
        if not written and blob_version(self._client.get(key) or b"") != version:
            self._client.set(key, data)  # a damaged blob (StoreCorruptError on get) is rewritten by a re-put

    def _replace_history(self, pipe, task: str, old: list[VersionRecord], new: list[VersionRecord]) -> None:
        """Queue (in MULTI) the writes that make `new` the task's history ([] deletes the task)."""
        key = self._history_key(task)
        if new:
            # `new` is history_after(...) of `old`, which the WATCH guarantees is what the list holds.
            pipe.lpush(key, json.dumps(new[0].to_json()))
            pipe.ltrim(key, 0, len(new) - 1)
            pipe.sadd(self._tasks_key, task)
        else:
            pipe.delete(key)
            pipe.srem(self._tasks_key, task)
        old_versions, new_versions = referenced_versions(old), referenced_versions(new)
        for version in new_versions - old_versions:
            pipe.sadd(self._refs_key(version), task)
        orphaned = old_versions - new_versions
        for version in orphaned:
            pipe.srem(self._refs_key(version), task)
        if orphaned:
            pipe.zadd(self._orphans_key, dict.fromkeys(orphaned, time.time()), gt=True)
        pipe.publish(self.channel, _event_json(StoreEvent(task, new[0].version if new else None)))

    def _build_refs(self) -> None:
        """Stores written before garbage collection have no refs:* keys, so their blobs would look
        unreferenced: add every history's versions and those its entries require, once (idempotent, so racing
        clients are harmless; a version a concurrent change drops keeps a stale member, which leaks its blob,
        never loses one)."""
        if not self._client.exists(self._refs_built_key):
            names = self._task_names("")
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lrange(self._history_key(name), 0, -1)
                entries = pipe.execute()
            with self._client.pipeline(transaction=False) as pipe:
                for name, history in zip(names, entries):
                    for version in referenced_versions(VersionRecord.from_json(json.loads(e)) for e in history):
                        pipe.sadd(self._refs_key(version), name)
                pipe.set(self._refs_built_key, 1)
                pipe.execute()
        self._refs_built = True

    def _collect_opportunistically(self) -> None:
        # The change has committed: a failed collection must not fail it (the orphans wait for a later one).
        try:
            self.collect_garbage()
        except StoreUnavailableError as e:
            logger.warning("collecting garbage failed; the orphan blobs stay for a later collection: %s", e)

    def _transaction(self, task: str, operation: str, change: Callable, also_watch: tuple[str, ...] = ()):
        """Read under WATCH, then write in MULTI/EXEC; retry if another client changed the task meanwhile.
        `change(pipe)` reads and returns (result, write(pipe) or None when there is nothing to write)."""
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_ATTEMPTS):
                try:
                    pipe.watch(self._history_key(task), *also_watch)
                    result, write = change(pipe)
                    if write is None:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    write(pipe)
                    pipe.execute()
                    return result
                except WatchError:
                    pipe.reset()
        raise StoreUnavailableError(f"{operation} of task {task!r} at {self.url}: expected to commit within "
                                    f"{_MAX_WATCH_ATTEMPTS} attempts, found the task changed by others every time")

    @contextlib.contextmanager
    def _failures_as_unavailable(self, operation: str) -> Iterator[None]:
        try:
            yield
        except RedisError as e:  # connection refused/lost, timeouts, LOADING, READONLY, OOM, ...
            raise StoreUnavailableError(f"Redis store at {self.url} failed during {operation}: "
                                        f"{type(e).__name__}: {e}") from e


def client_options(socket_timeout: float, retries: int) -> dict:
    """Bounded timeouts and retries, so an outage costs a caller about 2 x socket_timeout at worst
    (redis-py's own default retries 10 times with backoff)."""
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), retries),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def redact_url(url: str) -> str:
    """The URL for messages and logs, without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit(parts._replace(netloc=netloc))


def _event_json(event: StoreEvent) -> str:
    return json.dumps({"task": event.task, "version": event.version})


def _parse_event(data: bytes) -> StoreEvent | None:
    try:
        payload = json.loads(data)
        task, version = payload["task"], payload["version"]
    except (ValueError, TypeError, KeyError):
        task = version = None
    if not isinstance(task, str) or not (version is None or isinstance(version, str)):
        logger.warning("ignoring a malformed store event %r", data[:200])
        return None
    return StoreEvent(task, version)


class _EventListener:
    """A store's one pub/sub thread, started by the first subscribe. It owns its connection with no
    retries inside redis-py, so it sees every loss; it reconnects with backoff, and after a reconnect it
    replays what it missed (pub/sub drops messages while disconnected) by diffing list_tasks against the
    state it last knew. So events are at-least-once and the last one for a task names its current version."""

    def __init__(self, url: str, channel: str, socket_timeout: float, snapshot: Callable[[], dict[str, str]]):
        self._url, self._channel, self._snapshot = redact_url(url), channel, snapshot
        self._socket_timeout = socket_timeout
        self._client = redis.Redis.from_url(url, **client_options(socket_timeout, retries=0),
                                            health_check_interval=_HEALTH_CHECK_S)
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[StoreEvent], None]] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._known: dict[str, str] | None = None  # task -> version, as of the last snapshot or event
        self._replay_all = False  # a subscriber gave up waiting for the first connection
        self._backoff_s = _MIN_BACKOFF_S

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        with self._lock:
            subscription_id, self._next_id = self._next_id, self._next_id + 1
            self._callbacks[subscription_id] = callback
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"redis-store-events:{self._channel}",
                                                daemon=True)
                self._thread.start()
        # A put made right after subscribe() returns must reach the callback, so wait until the listener
        # is subscribed; bounded, so an outage does not hang the caller (then the first connect replays).
        if not self._connected.wait(2 * self._socket_timeout):
            self._replay_all = True
            logger.warning("store events from %s not connected yet; will replay on connect", self._url)

        def unsubscribe() -> None:
            with self._lock:
                self._callbacks.pop(subscription_id, None)
        return unsubscribe

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._socket_timeout + 1)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub()
            try:
                self._listen(pubsub)
            except (RedisError, StoreUnavailableError, OSError) as e:
                if self._connected.is_set():
                    logger.warning("store events from %s lost (%s: %s); reconnecting", self._url,
                                   type(e).__name__, e)
                self._connected.clear()
            finally:
                # Close before backing off: redis-py's own error handler has already reconnected and
                # resubscribed this pubsub, and nobody would read what that connection receives.
                with contextlib.suppress(Exception):
                    pubsub.close()
            if not self._stop.is_set():
                self._stop.wait(self._backoff_s)
                self._backoff_s = min(2 * self._backoff_s, _MAX_BACKOFF_S)
        self._connected.clear()

    def _listen(self, pubsub) -> None:
        pubsub.subscribe(self._channel)
        message = pubsub.get_message(timeout=self._socket_timeout)  # the subscribe confirmation
        if message is None or message["type"] != "subscribe":
            raise redis.TimeoutError(f"expected a subscribe confirmation within {self._socket_timeout} s, "
                                     f"found {message!r}")
        # Subscribed before the snapshot: a change after it arrives as a message, one before it is in it.
        snapshot = self._snapshot()
        if self._known is None and self._replay_all:
            self._known = {}
        if self._known is not None:
            for task in sorted(self._known.keys() | snapshot.keys()):
                if self._known.get(task) != snapshot.get(task):
                    self._deliver(StoreEvent(task, snapshot.get(task)))
        self._known = snapshot
        self._connected.set()
        self._backoff_s = _MIN_BACKOFF_S
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=0.25)  # short, so close() is prompt
            if message is None or message["type"] != "message" or (event := _parse_event(message["data"])) is None:
                continue
            if event.version is None:
                self._known.pop(event.task, None)
            else:
                self._known[event.task] = event.version
            self._deliver(event)

    def _deliver(self, event: StoreEvent) -> None:
        with self._lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # one broken subscriber must not stop the listener
                logger.exception("store event subscriber %r failed on %s", callback, event)
