"""Task adapters: which version each task serves, and where each version lives. The manager the
engine talks to; the parts live in their own modules:

- task_pointers.py: task -> current version (uploads, rollbacks, deletes, store events; any thread);
- adapter_loader.py: store -> decoded artifacts on loader threads, and the host cache;
- residency.py: what is compiled onto the device (KV prefix pages, LoRA pool rows), pins, eviction;
- the kinds themselves (adapters_store/kinds/) say what each kind becomes on the device.

Tiers: device <- host cache (decoded artifacts, LRU in bytes) <- store (bytes; a local directory or
Redis). Versions are pinned per request: `resolve` (any thread) gives a new request the task's
current version, and the request keeps it to the end, so an upload only affects later requests. A
replaced version is freed when its last request ends. A request whose version is not on the device
waits, while the others run, until a loader has fetched it and the engine thread has compiled it
(`poll`). Idle versions are evicted least-recently-used first when pages or pool rows run short; a
version in use never is. A LoRA or bottleneck version that has waited ROW_WAIT_GRACE_S for rows of
its pool makes just enough of the least-used resident adapters of that pool drain (their new
requests wait, unpinned) to free the rows it needs: otherwise steady traffic on resident adapters
could keep every row in use and starve it.

A version that passed validation but fails on the device (its compile raises, or a step running it
does) is quarantined: its requests end with AdapterFailedError and later ones are refused at once,
instead of the failure being retried every step or stopping the engine for every tenant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import decode_artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.adapters_store.store import AdapterStore
from prefixserve.config import AdapterLimits
from prefixserve.engine.adapter_handle import AdapterHandle
from prefixserve.engine.adapter_loader import AdapterLoader
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.pool_rows import PoolRowsExhausted
from prefixserve.engine.request import check_context_room
from prefixserve.engine.residency import DeviceResidency
from prefixserve.engine.task_pointers import TaskPointers, check_task_name
from prefixserve.errors import AdapterError, AdapterFailedError, EngineOverloadedError, PrefixServeError
from prefixserve.models.loader import Backbone

if TYPE_CHECKING:
    from prefixserve.engine.request import Request

log = logging.getLogger(__name__)

ROW_WAIT_GRACE_S = 1.0  # how long a LoRA may wait for pool rows before others' new requests are held back


@dataclass(frozen=True)
class PreparedUpload:
    """An upload decoded and validated off the engine thread, waiting to be compiled and stored."""

    artifact: Artifact
    data: bytes  # what the store keeps (the artifact's version is their sha256)
    required: tuple[Artifact, ...] = ()  # what it requires (an intrinsic's subspace) that the host cache lacked


class AdapterManager:
    def __init__(self, backbone: Backbone, runner: ModelRunner, pages: KVPageManager, limits: AdapterLimits,
                 store: AdapterStore, host_cache_bytes: int, num_loaders: int = 2):
        self.backbone, self.runner, self.pages, self.limits, self.store = backbone, runner, pages, limits, store
        self.fingerprint = backbone_fingerprint(backbone)
        self.pointers = TaskPointers(store)
        self.loader = AdapterLoader(store, self._decode, host_cache_bytes, self.pointers.not_servable, num_loaders)
        self.device = DeviceResidency(runner, pages, backbone.max_model_len, self.loader.required)
        self._waiting: dict[str, list[Request]] = {}  # version -> requests waiting for it
        self._quarantined: dict[str, AdapterFailedError] = {}  # version -> why it cannot be served here
        # version -> (when it first found too few free rows, in which row pool, how many it needs)
        self._row_starved: dict[str, tuple[float, str, int]] = {}
        self._draining: set[str] = set()  # resident versions whose new requests wait so their rows free up
        self._held: list[Request] = []  # those requests

    def close(self) -> None:
        self.pointers.close()
        self.loader.close()

    # ---- what other layers read ---------------------------------------------------------------
    @property
    def host(self):
        return self.loader.host

    @property
    def resident(self) -> dict[str, AdapterHandle]:
        return self.device.resident

    @property
    def cold_loads(self) -> int:
        return self.loader.cold_loads

    @property
    def device_evictions(self) -> int:
        return self.device.evictions

    # ---- any thread: task pointers (the replaced version is freed by free_stale) ------------------
    def resolve(self, task: str | None) -> str | None:
        """The version a new request of `task` pins (None: the plain backbone)."""
        return self.pointers.resolve(task)

    def tasks(self) -> dict[str, str]:
        return self.pointers.tasks()

    def knows(self, task: str) -> bool:
        return self.pointers.knows(task)

    def unregister(self, task: str) -> None:
        self.pointers.unregister(task)

    def rollback(self, task: str, version: str | None = None) -> str:
        return self.pointers.rollback(task, version)

    def prefix_len(self, version: str | None) -> int:
        """Virtual tokens of a version if known here (resident), else 0 (checked again when pinned)."""
        handle = self.device.resident.get(version) if version is not None else None
        return handle.prefix_len if handle is not None else 0

    def residency(self, version: str) -> str:
        """Where a version is now: "device" (compiled), "host" (decoded in memory) or "store"."""
        if version in self.device.resident:
            return "device"
        return "host" if version in self.loader.host else "store"

    # ---- uploads: validated and stored off the engine thread; only the compile runs on it ---------
    def register(self, task: str, data: bytes) -> Artifact:
        """Validate, store, and serve `task` at the new version from the next request on, all on the
        calling thread (offline use; the server splits the steps so that only the compile runs on the
        engine thread). A refused upload leaves no stored version behind."""
        upload = self.prepare_upload(task, data)
        self.compile_upload(upload)
        artifact = self.publish_upload(task, upload)
        self.free_stale()
        return artifact

    def prepare_upload(self, task: str, data: bytes) -> PreparedUpload:
        """Any thread: decode and validate an upload (every tensor and derived value in the engine's
        dtype) and fetch what it requires that this replica has not decoded: CPU and store work that
        touches no engine state, so the server runs it off the engine thread."""
        check_task_name(task)
        artifact = self._decode(data)
        required = tuple(self.loader.fetch_required(v) for v in get_kind(artifact.kind).requires(artifact.config)
                         if v not in self.loader.host)
        return PreparedUpload(artifact, data, required)

    def compile_upload(self, upload: PreparedUpload) -> None:
        """Engine thread, between steps: check what validation alone cannot see (an intrinsic's soft
        prompt through its subspace) and compile the version onto the device, so one the device
        cannot take is refused before it is stored (a LoRA's copy into the pool, or one prefill)."""
        artifact = upload.artifact
        for required in upload.required:
            self.loader.host.put(required)
        kind = get_kind(artifact.kind)
        kind.check_servable(artifact, self.device)
        self.loader.host.put(artifact)
        if kind.servable and artifact.version not in self.device.resident:
            self._compile_for_upload(artifact)

    def publish_upload(self, task: str, upload: PreparedUpload) -> Artifact:
        """Any thread: write a compiled upload to the store and point `task` at it (store I/O with
        fsyncs or a network round trip). The version it replaces, or this one if the write fails, is
        handed to the engine thread to free once nothing uses it."""
        self.pointers.publish(task, upload.artifact, upload.data)
        return upload.artifact

    def free_stale(self) -> None:
        """Drop the device copies of versions that lost their task (uploads, rollbacks, deletes and
        store events hand them over from other threads), unless a request still holds them."""
        for version in self.pointers.drain_stale():
            self._maybe_free(version)

    def _compile_for_upload(self, artifact: Artifact) -> None:
        """Compile a new version now: it warms the device, and a version the device cannot take is
        refused here, before it is stored, rather than failing every request later."""
        try:
            self._make_resident(artifact.version, artifact)
        except EngineOverloadedError:
            return  # no room now: compiled on first use (it fails then only its own requests)
        except AdapterError:
            raise
        except Exception as exc:  # e.g. a value the kernels cannot take: the version's fault, not the engine's
            log.exception("compiling uploaded version %s failed", artifact.version)
            raise AdapterError(f"the adapter passed validation but could not be compiled onto the device "
                               f"({type(exc).__name__}: {exc}); nothing was stored") from None
        self._quarantined.pop(artifact.version, None)  # the same bytes re-uploaded and compiled fine now

    # ---- engine thread: per request ----------------------------------------------------------
    def begin(self, request: Request) -> bool:
        """Pin the request's version if it is on the device (True); else start loading it (False)."""
        version = request.task_version
        if version is None:
            return True
        if version in self._quarantined:
            raise self._quarantined[version]
        handle = self.device.resident.get(version)
        if handle is not None and version in self._draining:
            self._held.append(request)
            return False
        if handle is not None:
            self._pin(request, handle)
            return True
        self._waiting.setdefault(version, []).append(request)
        self.loader.start(version)
        return False

    def share(self, request: Request, handle: AdapterHandle) -> None:
        """Pin the version another request holds (a choice of a request with n > 1)."""
        self._pin(request, handle)

    def forget(self, request: Request) -> None:
        """A waiting request left (aborted) before its adapter arrived."""
        waiting = self._waiting.get(request.task_version, [])
        if request in waiting:
            waiting.remove(request)
        if request in self._held:
            self._held.remove(request)

    def release(self, handle: AdapterHandle | None) -> None:
        if handle is None:
            return
        self.device.unpin(handle)
        self._maybe_free(handle.version)

    def poll(self) -> list[tuple[Request, PrefixServeError | None]]:
        """Between steps: free versions that lost their task, compile finished loads, and return the
        waiting requests that are now pinned (error None) or can never be served (their error)."""
        self.free_stale()
        self.device.begin_batch()  # the soft prompts compiled below share one forward
        try:
            ready = self._compile_finished()
        finally:
            failed = self.device.flush_batch()
        if failed:
            ready = [(r, self._unpin_failed(r, failed) if err is None and r.adapter.version in failed else err)
                     for r, err in ready]
            for version in failed:
                if (handle := self.device.resident.get(version)) is not None and not handle.num_users:
                    self.device.drop(handle)
        self._draining = self._choose_draining()
        return ready + self._release_held()

    def _unpin_failed(self, request: Request, failed: dict[str, AdapterError]) -> AdapterError:
        """A request pinned to a version whose batched prefill failed: let it go with that error."""
        handle, request.adapter = request.adapter, None
        self.device.unpin(handle)
        return failed[handle.version]

    def _compile_finished(self) -> list[tuple[Request, PrefixServeError | None]]:
        ready = []
        for version, future in self.loader.finished():
            requests = self._waiting.pop(version, [])
            starved = self._row_starved.pop(version, None)  # (since, pool, rows needed)
            try:
                handle = self._make_resident(version, future.result()[0])
            except EngineOverloadedError as exc:
                # Every page or pool row is held by running requests: wait for one to finish, retry then
                # (unless every request for it has gone meanwhile).
                if requests:
                    self.loader.retry(version, future)
                    self._waiting[version] = requests
                    if isinstance(exc, PoolRowsExhausted):
                        since = starved[0] if starved else time.monotonic()
                        self._row_starved[version] = (since, exc.pool, exc.rows_needed)
                continue
            except AdapterFailedError as exc:
                ready += [(r, self.quarantine(version, exc)) for r in requests]
                continue
            except PrefixServeError as exc:  # refused or the store is down: each new request tries again
                ready += [(r, exc) for r in requests]
                continue
            except Exception as exc:  # an unexpected failure of this version alone: the engine goes on
                log.exception("making version %s resident failed", version)
                ready += [(r, self.quarantine(version, exc)) for r in requests]
                continue
            ready += self._pin_all(requests, handle)
        return ready

    def _pin_all(self, requests: list[Request], handle: AdapterHandle) -> list[tuple[Request, PrefixServeError | None]]:
        ready = []
        for request in requests:
            try:
                self._pin(request, handle)
                ready.append((request, None))
            except PrefixServeError as exc:
                ready.append((request, exc))
        return ready

    def _choose_draining(self) -> set[str]:
        """Per row pool, once versions have waited ROW_WAIT_GRACE_S for its rows: the resident versions
        in use with the fewest requests, just enough of them that their rows cover what the waiting
        ones need. Their new requests are held (not pinned) so they drain; every other adapter keeps
        serving. The wait is bounded: a drained version is idle, evictable, and gives its rows to a
        waiting one."""
        deadline = time.monotonic() - ROW_WAIT_GRACE_S
        draining = set()
        for name, pool in self.runner.row_pools.items():
            need = sum(rows for since, starved_pool, rows in self._row_starved.values()
                       if starved_pool == name and since <= deadline)
            if need:
                draining |= self._drain_for(name, need - pool.num_free_rows)
        return draining

    def _drain_for(self, pool: str, need: int) -> set[str]:
        """The least-used in-use versions whose rows of `pool`, with the idle ones', cover `need`."""
        in_use = []
        for handle in self.device.resident.values():
            if not (rows := handle.pool_rows(pool)):
                continue
            if handle.num_users:
                in_use.append(handle)
            else:
                need -= rows  # idle: evicted for a waiting one at its next try
        draining = set()
        for handle in sorted(in_use, key=lambda h: h.num_users):
            if need <= 0:
                break
            draining.add(handle.version)
            need -= handle.pool_rows(pool)
        return draining

    def _release_held(self) -> list[tuple[Request, PrefixServeError | None]]:
        """Held requests whose version no starved one waits on any more: pinned again, or loaded
        again if their version was evicted meanwhile."""
        ready, still_held = [], []
        for request in self._held:
            version = request.task_version
            handle = self.device.resident.get(version)
            if version in self._draining:
                still_held.append(request)
            elif handle is not None:
                ready += self._pin_all([request], handle)
            else:
                self._waiting.setdefault(version, []).append(request)
                self.loader.start(version)
        self._held = still_held
        return ready

    def quarantine(self, version: str, cause: Exception) -> AdapterFailedError:
        """Stop serving `version` on this server (requests of it are refused from now on) and return
        the error its requests end with. Its device copy goes with its last running request."""
        error = self._quarantined.get(version)
        if error is None:
            error = cause if isinstance(cause, AdapterFailedError) else AdapterFailedError(
                f"task version {version} cannot be served on this server ({type(cause).__name__}: {cause}); "
                f"it is quarantined: upload a fixed version or roll back")
            self._quarantined[version] = error
        self._maybe_free(version)
        return error

    @property
    def num_loading(self) -> int:
        return len(self.loader)

    def wait_for_load(self, timeout: float) -> None:
        """Block the engine thread until some load finishes (nothing else can run meanwhile)."""
        self.loader.wait(timeout)

    def reclaim_pages(self, num_pages: int) -> int:
        """Evict idle prefixes until num_pages are free (the scheduler asks before it preempts)."""
        return self.device.reclaim_pages(num_pages)

    def _pin(self, request: Request, handle: AdapterHandle) -> None:
        # Checked again here: admission knew the task's virtual tokens only if the version was resident.
        check_context_room(request.num_prompt_tokens, handle.prefix_len, request.params.max_new_tokens,
                           self.backbone.max_model_len)
        self.device.pin(handle)
        request.adapter = handle

    def _make_resident(self, version: str, artifact: Artifact | None = None) -> AdapterHandle:
        artifact = artifact or self.loader.host.get(version)
        if artifact is None:  # evicted from the host cache between load and compile: fetch again
            artifact = self.loader.fetch(version)
        return self.device.make_resident(version, artifact)

    def _decode(self, data: bytes) -> Artifact:
        return decode_artifact(data, expected_fingerprint=self.fingerprint, limits=self.limits,
                               arch=self.backbone.arch, dtype=self.runner.dtype)

    def _maybe_free(self, version: str) -> None:
        handle = self.device.resident.get(version)
        if handle is None or handle.num_users:
            return
        if self.pointers.is_current(version) and version not in self._quarantined:
            return  # still current for some task: it stays as a device cache entry until space is needed
        self.device.drop(handle)
