"""Loading adapter versions without stalling the step loop: bytes from the store, validated and
decoded on loader threads (with the artifacts a version requires, such as an intrinsic's
subspace), kept decoded in the host cache (LRU in bytes). The engine thread starts loads and
collects finished ones between steps; compiling them onto the device is residency.py's part."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.adapters_store.store import AdapterStore
from prefixserve.engine.host_cache import HostCache
from prefixserve.engine.task_pointers import NOT_SERVABLE
from prefixserve.errors import AdapterError, InvalidRequestError, TaskNotFoundError


class AdapterLoader:
    def __init__(self, store: AdapterStore, decode: Callable[[bytes], Artifact], host_cache_bytes: int,
                 not_servable: set[str], num_loaders: int = 2):
        self.store, self.decode = store, decode
        self.host = HostCache(host_cache_bytes)
        self._not_servable = not_servable  # shared with the task pointers: versions found to be no task
        self._loading: dict[str, Future[list[Artifact]]] = {}  # version -> [artifact, *what it requires]
        self._retried: set[str] = set()  # loads put back to wait for room: their result is cached already
        self._pool = ThreadPoolExecutor(num_loaders, thread_name_prefix="prefixserve-adapter-load")
        self.cold_loads = 0  # versions fetched from the store for a request

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # no loader thread may outlive the engine

    def __len__(self) -> int:
        return len(self._loading)

    def start(self, version: str) -> None:
        if version in self._loading:
            return
        cached = self.host.get(version)
        if cached is not None and not get_kind(cached.kind).requires(cached.config):
            done: Future[list[Artifact]] = Future()
            done.set_result([cached])
            self._loading[version] = done
            return
        self.cold_loads += 1
        self._loading[version] = self._pool.submit(self._fetch, version)

    def finished(self) -> list[tuple[str, Future[list[Artifact]]]]:
        """Loads that are done, taken out (put one back with `retry` to try it again later). A load's
        artifacts enter the host cache once, when it first finishes: putting them again at every
        retry would evict, step after step, what other waiting loads put there."""
        done = []
        for version in [v for v, f in self._loading.items() if f.done()]:
            future = self._loading.pop(version)
            if version not in self._retried and future.exception() is None:
                for artifact in future.result():
                    self.host.put(artifact)
            self._retried.discard(version)
            done.append((version, future))
        return done

    def retry(self, version: str, future: Future[list[Artifact]]) -> None:
        self._loading[version] = future
        self._retried.add(version)

    def wait(self, timeout: float) -> None:
        """Block the engine thread until some load finishes (nothing else can run meanwhile)."""
        if self._loading:
            wait(list(self._loading.values()), timeout=timeout, return_when="FIRST_COMPLETED")

    def required(self, version: str) -> Artifact:
        """An artifact another one requires, decoded: from the host cache, else the store."""
        artifact = self.host.get(version)
        if artifact is None:
            artifact = self.fetch_required(version)
            self.host.put(artifact)
        return artifact

    def fetch_required(self, version: str) -> Artifact:
        try:
            return self.decode(self.store.get(version))
        except TaskNotFoundError:
            raise AdapterError(f"the adapter needs {version}, which is not registered; upload the artifact it "
                               f"requires (an intrinsic vector's subspace) first") from None

    def fetch(self, version: str) -> Artifact:
        """The version itself, decoded, on the calling thread (its host copy was evicted meanwhile)."""
        return self._fetch(version)[0]

    def _fetch(self, version: str) -> list[Artifact]:
        """Loader thread: bytes from the store, validated and decoded, with what the version requires."""
        artifact = self.decode(self.store.get(version))
        kind = get_kind(artifact.kind)
        if not kind.servable:
            self._not_servable.add(version)
            raise InvalidRequestError(NOT_SERVABLE.format(task=version[:12]))
        return [artifact, *(self.decode(self.store.get(v)) for v in kind.requires(artifact.config))]
