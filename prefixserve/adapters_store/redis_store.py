"""RedisStore: the adapter store shared by many replicas.

Keys (ns = namespace):
    {ns}:blob:{version}   artifact bytes, written once (SET NX)
    {ns}:history:{task}   list of JSON VersionRecords, newest first, capped at MAX_HISTORY; head = current
    {ns}:tasks            set of task names (list_tasks SSCANs it; never KEYS)
    {ns}:events           pub/sub channel of JSON StoreEvents

A put writes the blob first, then changes history, task set and PUBLISH in one MULTI/EXEC under WATCH
of the history key, so readers see the old or the new version and an event is published exactly when
the change commits. Every Redis failure surfaces as StoreUnavailableError (503) naming the URL and the
operation, after at most one quick retry: a replica keeps serving the tasks it already holds."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry

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
from prefixserve.errors import ConfigError, StoreCorruptError, StoreUnavailableError, TaskNotFoundError

logger = logging.getLogger(__name__)

_MAX_WATCH_ATTEMPTS = 50  # optimistic transactions on one task; contention is a few writers at most
_MIN_BACKOFF_S, _MAX_BACKOFF_S = 0.05, 2.0  # listener reconnects
_HEALTH_CHECK_S = 5  # PING an idle pub/sub connection this often, so a silently dead peer is noticed


class RedisStore(AdapterStore):
    """`url` as redis-py takes it (redis://[:password@]host:port/db, rediss:// for TLS); `namespace`
    prefixes every key and the event channel, so stores of different deployments share one Redis;
    `socket_timeout` bounds every command and connect (an outage costs a caller about twice that)."""

    def __init__(self, url: str, *, namespace: str = "prefixserve", socket_timeout: float = 2.0):
        if not namespace or not isinstance(namespace, str):
            raise ConfigError(f"expected a non-empty Redis namespace, found {namespace!r}")
        self.url = redact_url(url)
        self.namespace = namespace
        self.channel = f"{namespace}:events"
        self._tasks_key = f"{namespace}:tasks"
        try:
            self._client = redis.Redis.from_url(url, **client_options(socket_timeout, retries=1))
        except ValueError as e:
            raise ConfigError(f"expected a redis:// or rediss:// URL, found {self.url!r} ({e})") from None
        self._events = _EventListener(url, self.channel, socket_timeout, snapshot=self.list_tasks)

    def put(self, task: str, data: bytes, kind: str) -> str:
        data = check_put_args(task, data, kind)
        version = blob_version(data)
        record = VersionRecord(version=version, kind=kind, num_bytes=len(data), created_at=time.time())

        def change(pipe) -> tuple[str, Callable | None]:
            head = pipe.lindex(self._history_key(task), 0)
            if head is not None and json.loads(head)["version"] == version:
                return version, None  # already current: idempotent, no entry and no event
            return version, lambda pipe: self._push(pipe, task, record)

        with self._failures_as_unavailable("put"):
            self._write_blob(version, data)  # before anything points at it
            return self._transaction(task, "put", change)

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
            entries = self._client.lrange(self._history_key(check_task_name(task)), 0, -1)
        return [VersionRecord(**json.loads(entry)) for entry in entries]

    def list_tasks(self, prefix: str = "") -> dict[str, str]:
        with self._failures_as_unavailable("list_tasks"):
            # Filter in Python rather than with SSCAN MATCH: task names may hold glob characters.
            names = [name.decode() for name in self._client.sscan_iter(self._tasks_key, count=1000)]
            names = [name for name in names if name.startswith(prefix)]
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lindex(self._history_key(name), 0)
                heads = pipe.execute()
        # a task deleted between SSCAN and LINDEX has no head
        return {name: json.loads(head)["version"] for name, head in zip(names, heads) if head is not None}

    def rollback(self, task: str, version: str | None = None) -> str:
        check_task_name(task)

        def change(pipe) -> tuple[str, Callable | None]:
            history = [VersionRecord(**json.loads(e)) for e in pipe.lrange(self._history_key(task), 0, -1)]
            target = rollback_target(task, history, version)
            record = VersionRecord(target.version, target.kind, target.num_bytes, created_at=time.time())
            return target.version, lambda pipe: self._push(pipe, task, record)

        with self._failures_as_unavailable("rollback"):
            return self._transaction(task, "rollback", change)

    def delete(self, task: str) -> None:
        check_task_name(task)

        def change(pipe) -> tuple[None, Callable]:
            if not pipe.exists(self._history_key(task)):
                raise TaskNotFoundError(f"expected task {task!r} in Redis store {self.url} "
                                        f"(namespace {self.namespace!r}), found no such task")

            def write(pipe) -> None:
                pipe.delete(self._history_key(task))
                pipe.srem(self._tasks_key, task)
                pipe.publish(self.channel, _event_json(StoreEvent(task, None)))
            return None, write

        with self._failures_as_unavailable("delete"):
            self._transaction(task, "delete", change)

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

    def _write_blob(self, version: str, data: bytes) -> None:
        key = self._blob_key(version)
        if not self._client.set(key, data, nx=True) and blob_version(self._client.get(key) or b"") != version:
            self._client.set(key, data)  # a damaged blob (StoreCorruptError on get) is rewritten by a re-put

    def _push(self, pipe, task: str, record: VersionRecord) -> None:
        pipe.lpush(self._history_key(task), json.dumps(asdict(record)))
        pipe.ltrim(self._history_key(task), 0, MAX_HISTORY - 1)
        pipe.sadd(self._tasks_key, task)
        pipe.publish(self.channel, _event_json(StoreEvent(task, record.version)))

    def _transaction(self, task: str, operation: str, change: Callable):
        """Read under WATCH, then write in MULTI/EXEC; retry if another client changed the task meanwhile.
        `change(pipe)` reads and returns (result, write(pipe) or None when there is nothing to write)."""
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_ATTEMPTS):
                try:
                    pipe.watch(self._history_key(task))
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
