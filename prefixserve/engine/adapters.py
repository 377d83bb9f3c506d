"""Task adapters: which version each task serves, and where each version lives.

Tiers: device (compiled KV prefix pages / LoRA pool rows) <- host cache (decoded artifacts, LRU in
bytes) <- store (bytes; a local directory or Redis). Every prompt-style kind is compiled once per
version into KV pages shared read-only by all its requests, reference-counted: one reference for
the resident copy, one per request. A LoRA version owns one row of the LoRA pool per rank.

Versions are pinned per request: `resolve` (any thread) gives a new request the task's current
version, and the request keeps it to the end, so an upload only affects later requests. Store
events (uploads through any replica) update the task pointers; a replaced version is freed when
its last request ends. A request whose version is not on the device waits, while the others run,
until a background loader has fetched it and the engine thread has compiled it (`poll`). Idle
versions are evicted least-recently-used first when pages or pool rows run short; a version in use
never is. A LoRA version that has waited ROW_WAIT_GRACE_S for pool rows holds back new requests of
the other LoRA versions (they wait, unpinned) until it is resident: otherwise steady traffic on
resident adapters could keep every row in use and starve it.

A version that passed validation but fails on the device (its compile raises, or a step running it
does) is quarantined: its requests end with AdapterFailedError and later ones are refused at once,
instead of the failure being retried every step or stopping the engine for every tenant.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import Artifact, check_finite_in_dtype, decode_artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.adapters_store.store import AdapterStore, StoreEvent
from prefixserve.config import AdapterLimits
from prefixserve.engine.host_cache import HostCache
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.lora_pool import LoRAAllocation
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.request import check_context_room
from prefixserve.errors import (
    AdapterError,
    AdapterFailedError,
    EngineOverloadedError,
    InvalidRequestError,
    PrefixServeError,
    TaskNotFoundError,
)
from prefixserve.models.loader import Backbone

if TYPE_CHECKING:
    from prefixserve.engine.request import Request

log = logging.getLogger(__name__)

BASE_TASK = "base"
MAX_TASK_NAME_CHARS = 200  # of the engine's "<tenant>/<task>"
TASK_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]*$"  # what a tenant may call a task (the engine adds "<tenant>/")
_TASK_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:/-]{{0,{MAX_TASK_NAME_CHARS - 1}}}$")
_LORA_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.lora_a$")
ROW_WAIT_GRACE_S = 1.0  # how long a LoRA may wait for pool rows before others' new requests are held back
_SUBSPACE_NOT_SERVABLE = ("task {task!r} is an IPT subspace (a shared decoder), not servable itself; serve an "
                          "intrinsic task that points at it")


@dataclass(frozen=True)
class PreparedUpload:
    """An upload decoded and validated off the engine thread, waiting to be compiled and stored."""

    artifact: Artifact
    data: bytes  # what the store keeps (the artifact's version is their sha256)
    subspace: Artifact | None = None  # an intrinsic's subspace, decoded here when the host cache lacked it


@dataclass(eq=False)
class AdapterHandle:
    """One device-resident adapter version."""

    version: str
    kind: str
    prefix_pages: list[int] = field(default_factory=list)  # prompt-style kinds: the shared KV prefix
    prefix_len: int = 0
    lora: LoRAAllocation | None = None  # lora: its rows in the pool
    num_users: int = 0  # requests holding it


class AdapterManager:
    def __init__(self, backbone: Backbone, runner: ModelRunner, pages: KVPageManager, limits: AdapterLimits,
                 store: AdapterStore, host_cache_bytes: int, num_loaders: int = 2):
        self.backbone, self.runner, self.pages, self.limits, self.store = backbone, runner, pages, limits, store
        self.fingerprint = backbone_fingerprint(backbone)
        self.host = HostCache(host_cache_bytes)
        self._tasks: dict[str, str] = {}  # task -> current version; written by the engine and store threads
        # Serialises pointer writes (and the store calls they follow) across the engine, store-event
        # and caller threads, so a late event can never resurrect a pointer a delete just removed.
        self._pointer_lock = threading.Lock()
        self._resident: OrderedDict[str, AdapterHandle] = OrderedDict()  # version -> handle, least recent first
        self._loading: dict[str, Future] = {}  # version -> fetch + decode on a loader thread
        self._waiting: dict[str, list[Request]] = {}  # version -> requests waiting for it
        self._stale: queue.SimpleQueue[str] = queue.SimpleQueue()  # versions that may have lost their task
        self._subspaces: set[str] = set()  # subspace versions seen here: refused at admission
        self._quarantined: dict[str, AdapterFailedError] = {}  # version -> why it cannot be served here
        self._row_starved: dict[str, float] = {}  # LoRA version -> when it first found too few free rows
        self._held: list[Request] = []  # requests of resident LoRAs held back for a starved version
        self._loader = ThreadPoolExecutor(num_loaders, thread_name_prefix="prefixserve-adapter-load")
        self._unsubscribe = store.subscribe(self._on_store_event)
        self.cold_loads = 0  # versions fetched from the store for a request
        self.device_evictions = 0  # idle versions dropped from the device to make room

    def close(self) -> None:
        self._unsubscribe()
        self._loader.shutdown(wait=True, cancel_futures=True)  # no loader thread may outlive the engine

    # ---- any thread --------------------------------------------------------------------------
    def resolve(self, task: str | None) -> str | None:
        """The version a new request of `task` pins (None: the plain backbone)."""
        if task is None or task == BASE_TASK:
            return None
        version = self._tasks.get(task)
        if version is None:
            with self._pointer_lock:
                version = self._tasks.get(task) or self.store.current(task)
                if version is None:
                    raise TaskNotFoundError(f"task {task!r} is not registered")
                self._tasks[task] = version
        if version in self._subspaces:
            raise InvalidRequestError(_SUBSPACE_NOT_SERVABLE.format(task=task))
        return version

    def prefix_len(self, version: str | None) -> int:
        """Virtual tokens of a version if known here (resident), else 0 (checked again when pinned)."""
        handle = self._resident.get(version) if version is not None else None
        return handle.prefix_len if handle is not None else 0

    def tasks(self) -> dict[str, str]:
        return dict(self._tasks)

    def knows(self, task: str) -> bool:
        """Whether `task` has a current version here: registered, or resolved by a request, and not
        deleted since (a deletion on any replica reaches this one through the store's events)."""
        return task in self._tasks

    def _on_store_event(self, event: StoreEvent) -> None:
        # Runs on the store's thread. Re-read the pointer rather than trusting the event's version:
        # events of rapid uploads may arrive after a later one was read, and the store is the truth.
        with self._pointer_lock:
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

    # ---- engine thread: registration ---------------------------------------------------------
    def register(self, task: str, data: bytes) -> Artifact:
        """Validate, store, and serve `task` at the new version from the next request on, all on the
        calling thread (offline use; the server splits the steps so that only the compile runs on the
        engine thread). A refused upload leaves no stored version behind."""
        upload = self.prepare_upload(task, data)
        self.compile_upload(upload)
        artifact = self.publish_upload(task, upload)
        self.free_stale()
        return artifact

    def free_stale(self) -> None:
        """Drop the device copies of versions that lost their task (uploads, rollbacks, deletes and
        store events hand them over from other threads), unless a request still holds them."""
        while not self._stale.empty():
            self._maybe_free(self._stale.get())

    # ---- any thread: the parts of an upload that must not stall the step loop --------------------
    def prepare_upload(self, task: str, data: bytes) -> PreparedUpload:
        """Decode and validate an upload (every tensor and derived value in the engine's dtype) and
        fetch an intrinsic's subspace if this replica has not decoded it: CPU and store work that
        touches no engine state, so the server runs it off the engine thread."""
        if task == BASE_TASK or not _TASK_NAME.match(task):
            raise InvalidRequestError(f"task names are 1-200 characters of letters, digits and ._:/- (not "
                                      f"{BASE_TASK!r}), found {task!r}")
        artifact = self._decode(data)
        subspace = None
        if artifact.kind == "intrinsic" and artifact.config["subspace_version"] not in self.host:
            subspace = self._fetch_subspace(artifact)
        return PreparedUpload(artifact, data, subspace)

    def publish_upload(self, task: str, upload: PreparedUpload) -> Artifact:
        """Write a compiled upload to the store and point `task` at it (store I/O with fsyncs or a
        network round trip: off the engine thread). The version it replaces, or this one if the
        write fails, is handed to the engine thread to free once nothing uses it."""
        artifact = upload.artifact
        try:
            with self._pointer_lock:
                self.store.put(task, upload.data, artifact.kind, requires=(artifact.config["subspace_version"],)
                               if artifact.kind == "intrinsic" else ())  # its subspace's blob is kept with it
                previous = self._tasks.get(task)
                self._tasks[task] = artifact.version
        except BaseException:
            self._stale.put(artifact.version)  # compiled for nothing unless a task points at it
            raise
        if artifact.kind == "subspace":
            self._subspaces.add(artifact.version)
        if previous is not None and previous != artifact.version:
            self._stale.put(previous)
        return artifact

    # ---- engine thread: registration ---------------------------------------------------------
    def compile_upload(self, upload: PreparedUpload) -> None:
        """Between steps: decode an intrinsic's soft prompt and compile the version onto the device,
        so one the device cannot take is refused before it is stored. The only part of an upload
        that runs on the engine thread (a LoRA's copy into its slot, or one prefill of P tokens)."""
        artifact = upload.artifact
        if upload.subspace is not None:
            self.host.put(upload.subspace)
        if artifact.kind == "intrinsic":
            self._decode_intrinsic(artifact)  # refuse a missing subspace or a soft prompt that overflows
        self.host.put(artifact)
        if artifact.kind != "subspace" and artifact.version not in self._resident:
            self._compile_for_upload(artifact)

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

    # ---- any thread: task pointers (store writes; the replaced version is freed by free_stale) ----
    def unregister(self, task: str) -> None:
        with self._pointer_lock:
            if self.store.current(task) is None:
                raise TaskNotFoundError(f"task {task!r} is not registered")
            self.store.delete(task)
            previous = self._tasks.pop(task, None)
        if previous is not None:
            self._stale.put(previous)

    def rollback(self, task: str, version: str | None = None) -> str:
        """Make an earlier version (the previous one by default) current; returns it."""
        with self._pointer_lock:
            target = self.store.rollback(task, version)
            previous = self._tasks.get(task)
            self._tasks[task] = target
        if previous is not None and previous != target:
            self._stale.put(previous)
        return target

    # ---- engine thread -------------------------------------------------------------------------

    def residency(self, version: str) -> str:
        """Where a version is now: "device" (compiled), "host" (decoded in memory) or "store"."""
        if version in self._resident:
            return "device"
        return "host" if version in self.host else "store"

    # ---- engine thread: per request ----------------------------------------------------------
    def begin(self, request: Request) -> bool:
        """Pin the request's version if it is on the device (True); else start loading it (False)."""
        version = request.task_version
        if version is None:
            return True
        if version in self._quarantined:
            raise self._quarantined[version]
        handle = self._resident.get(version)
        if handle is not None and handle.lora is not None and self._starving_other(version):
            self._held.append(request)
            return False
        if handle is not None:
            self._pin(request, handle)
            return True
        self._waiting.setdefault(version, []).append(request)
        self._start_load(version)
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
        handle.num_users -= 1
        self.pages.free(handle.prefix_pages)
        self._maybe_free(handle.version)

    def poll(self) -> list[tuple[Request, PrefixServeError | None]]:
        """Between steps: free versions that lost their task, compile finished loads, and return the
        waiting requests that are now pinned (error None) or can never be served (their error)."""
        self.free_stale()
        ready = []
        for version in [v for v, f in self._loading.items() if f.done()]:
            future = self._loading.pop(version)
            requests = self._waiting.pop(version, [])
            starved_since = self._row_starved.pop(version, None)
            try:
                for artifact in future.result():
                    self.host.put(artifact)
                handle = self._make_resident(version, future.result()[0])
            except EngineOverloadedError:
                # Every page or pool row is held by running requests: wait for one to finish, retry then
                # (unless every request for it has gone meanwhile).
                if requests:
                    self._loading[version], self._waiting[version] = future, requests
                    if future.result()[0].kind == "lora":
                        self._row_starved[version] = starved_since or time.monotonic()
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
        return ready + self._release_held()

    def _pin_all(self, requests: list[Request], handle: AdapterHandle) -> list[tuple[Request, PrefixServeError | None]]:
        ready = []
        for request in requests:
            try:
                self._pin(request, handle)
                ready.append((request, None))
            except PrefixServeError as exc:
                ready.append((request, exc))
        return ready

    def _starving_other(self, version: str) -> bool:
        """Whether another LoRA version has waited for pool rows past the grace period."""
        deadline = time.monotonic() - ROW_WAIT_GRACE_S
        return any(v != version and since <= deadline for v, since in self._row_starved.items())

    def _release_held(self) -> list[tuple[Request, PrefixServeError | None]]:
        """Held requests whose version no starved one waits on any more: pinned again, or loaded
        again if their version was evicted meanwhile."""
        ready, still_held = [], []
        for request in self._held:
            version = request.task_version
            handle = self._resident.get(version)
            if self._starving_other(version):
                still_held.append(request)
            elif handle is not None:
                ready += self._pin_all([request], handle)
            else:
                self._waiting.setdefault(version, []).append(request)
                self._start_load(version)
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
        return len(self._loading)

    def wait_for_load(self, timeout: float) -> None:
        """Block the engine thread until some load finishes (nothing else can run meanwhile)."""
        if self._loading:
            wait(list(self._loading.values()), timeout=timeout, return_when="FIRST_COMPLETED")

    def reclaim_pages(self, num_pages: int) -> int:
        """Evict idle prefixes (least recently used first) until num_pages are free; returns how many
        pages were freed. The scheduler calls this before it preempts anyone."""
        freed = 0
        for handle in [h for h in self._resident.values() if not h.num_users and h.prefix_pages]:
            if self.pages.num_free_pages >= num_pages:
                break
            freed += len(handle.prefix_pages)
            self._drop(handle)
            self.device_evictions += 1
        return freed

    def _pin(self, request: Request, handle: AdapterHandle) -> None:
        # Checked again here: admission knew the task's virtual tokens only if the version was resident.
        check_context_room(request.num_prompt_tokens, handle.prefix_len, request.params.max_new_tokens,
                           self.backbone.max_model_len)
        handle.num_users += 1
        self.pages.share(handle.prefix_pages)
        self._resident.move_to_end(handle.version)
        request.adapter = handle

    # ---- loading -----------------------------------------------------------------------------
    def _start_load(self, version: str) -> None:
        if version in self._loading:
            return
        cached = self.host.get(version)
        if cached is not None and cached.kind != "intrinsic":
            done: Future = Future()
            done.set_result([cached])
            self._loading[version] = done
            return
        self.cold_loads += 1
        self._loading[version] = self._loader.submit(self._fetch, version)

    def _fetch(self, version: str) -> list[Artifact]:
        """Loader thread: bytes from the store, validated and decoded (plus an intrinsic's subspace)."""
        artifact = self._decode(self.store.get(version))
        if artifact.kind == "subspace":
            self._subspaces.add(version)
            raise InvalidRequestError(_SUBSPACE_NOT_SERVABLE.format(task=version[:12]))
        if artifact.kind == "intrinsic":
            return [artifact, self._decode(self.store.get(artifact.config["subspace_version"]))]
        return [artifact]

    def _decode(self, data: bytes) -> Artifact:
        return decode_artifact(data, expected_fingerprint=self.fingerprint, limits=self.limits,
                               arch=self.backbone.arch, dtype=self.runner.dtype)

    def _subspace(self, intrinsic: Artifact) -> Artifact:
        subspace = self.host.get(intrinsic.config["subspace_version"])
        if subspace is None:
            subspace = self._fetch_subspace(intrinsic)
            self.host.put(subspace)
        return subspace

    def _fetch_subspace(self, intrinsic: Artifact) -> Artifact:
        version = intrinsic.config["subspace_version"]
        try:
            return self._decode(self.store.get(version))
        except TaskNotFoundError:
            raise AdapterError(f"the intrinsic vector needs subspace {version}, which is not registered; "
                               f"upload the subspace artifact first") from None

    # ---- device residency --------------------------------------------------------------------
    def _make_resident(self, version: str, artifact: Artifact | None = None) -> AdapterHandle:
        artifact = artifact or self.host.get(version)
        if artifact is None:  # evicted from the host cache between load and compile: fetch again
            artifact = self._fetch(version)[0]
        handle = AdapterHandle(version, artifact.kind)
        tensors = artifact.tensors
        if artifact.kind == "lora":
            rank = artifact.config["rank"]
            pool = self.runner.lora_pool
            if pool.num_free_rows < rank:
                self._evict_idle(lambda: pool.num_free_rows >= rank, lora_only=True)
            handle.lora = self._load_lora(artifact)
        else:
            if artifact.kind == "prefix":
                num_tokens = tensors["keys"].shape[1]
            elif artifact.kind == "prompt":
                embeddings = tensors["embeddings"]
                num_tokens = embeddings.shape[0]
            elif artifact.kind == "intrinsic":
                embeddings = self._decode_intrinsic(artifact)
                num_tokens = embeddings.shape[0]
            else:
                raise AdapterError(f"kind {artifact.kind!r} cannot be served")
            if num_tokens >= self.backbone.max_model_len:
                raise AdapterError(f"the adapter has {num_tokens} virtual tokens; the context holds "
                                   f"{self.backbone.max_model_len}")
            num_pages = self.pages.pages_for(num_tokens)
            if not self.pages.can_allocate(num_pages):
                self._evict_idle(lambda: self.pages.can_allocate(num_pages))
            if not self.pages.can_allocate(num_pages):
                raise EngineOverloadedError(f"the KV pool has no room for a {num_tokens}-token prefix now; "
                                            f"retry later")
            handle.prefix_pages, handle.prefix_len = self.pages.allocate(num_pages), num_tokens
            try:
                if artifact.kind == "prefix":
                    self.runner.write_prefix(tensors["keys"], tensors["values"], handle.prefix_pages)
                else:
                    self.runner.prefill_embeddings(embeddings, handle.prefix_pages)
                if not self.runner.prefix_is_finite(handle.prefix_pages, num_tokens):
                    raise AdapterError(f"{artifact.kind}: expected the task's {num_tokens} virtual tokens to give "
                                       f"finite keys and values through the backbone, found NaN/Inf")
            except Exception:
                # Zeroed before reuse: attention multiplies masked slots by 0, and NaN * 0 is NaN.
                self.runner.clear_pages(handle.prefix_pages)
                self.pages.free(handle.prefix_pages)
                raise
        self._resident[version] = handle
        return handle

    def _decode_intrinsic(self, artifact: Artifact) -> torch.Tensor:
        subspace = self._subspace(artifact)
        z = artifact.tensors["z"]
        expected = subspace.config["intrinsic_dim"]
        if z.shape != (expected,):
            raise AdapterError(f"subspace {subspace.version[:12]} decodes {expected}-dimensional vectors, found z "
                               f"of shape {tuple(z.shape)}")
        embeddings = get_kind("subspace").decode(subspace.tensors, z, subspace.config)  # [P, hidden]
        check_finite_in_dtype("intrinsic", {f"the soft prompt decoded through subspace {subspace.version[:12]}":
                                            embeddings}, self.runner.dtype)
        return embeddings

    def _load_lora(self, artifact: Artifact) -> LoRAAllocation:
        weights = {}
        for name, a in artifact.tensors.items():
            match = _LORA_KEY.match(name)
            if match:
                layer, target = int(match.group(1)), match.group(2)
                weights[(layer, target)] = (a, artifact.tensors[f"layers.{layer}.{target}.lora_b"])
        return self.runner.lora_pool.load(weights, get_kind("lora").scaling(artifact.config))

    def _evict_idle(self, enough, lora_only: bool = False) -> None:
        for handle in list(self._resident.values()):  # least recently used first
            if enough():
                return
            if not handle.num_users and (handle.lora is not None if lora_only else True):
                self._drop(handle)
                self.device_evictions += 1

    def _maybe_free(self, version: str) -> None:
        handle = self._resident.get(version)
        if handle is None or handle.num_users:
            return
        if version in self._tasks.values() and version not in self._quarantined:
            return  # still current for some task: it stays as a device cache entry until space is needed
        self._drop(handle)

    def _drop(self, handle: AdapterHandle) -> None:
        del self._resident[handle.version]
        self.pages.free(handle.prefix_pages)
        if handle.lora is not None:
            self.runner.lora_pool.free(handle.lora)

