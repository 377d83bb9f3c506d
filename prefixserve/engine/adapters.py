"""Task adapters on the device: which version each task serves now, and where each version lives.

Every prompt-style kind is compiled once per version into a KV prefix that sits in the paged KV
pool: `prefix` artifacts are written as they are, `prompt` soft prompts (and `intrinsic` vectors,
decoded through their `subspace`) are run through the backbone once. The pages are shared
read-only, reference-counted: the manager holds one reference while the version is some task's
current one, and every request using it holds another, so N requests keep ONE copy. LoRA
versions occupy a slot. A request pins its version at admission (`acquire`) and keeps it to the
end, so re-registering a task only affects requests that arrive later; a replaced version is
freed when its last request ends.

Mutated only on the engine thread; the read-only lookups (`prefix_len`) are safe from others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import Artifact, decode_artifact
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.config import AdapterLimits
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.errors import AdapterError, EngineOverloadedError, InvalidRequestError, TaskNotFoundError
from prefixserve.models.loader import Backbone

BASE_TASK = "base"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")
_LORA_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.lora_a$")


@dataclass(eq=False)
class AdapterHandle:
    """One device-resident adapter version."""

    version: str
    kind: str
    prefix_pages: list[int] = field(default_factory=list)  # prompt-style kinds: the shared KV prefix
    prefix_len: int = 0
    lora_slot: int = -1  # lora: its slot in the stacked weights
    num_users: int = 0  # requests holding it


class AdapterManager:
    def __init__(self, backbone: Backbone, runner: ModelRunner, pages: KVPageManager, limits: AdapterLimits):
        self.backbone, self.runner, self.pages, self.limits = backbone, runner, pages, limits
        self.fingerprint = backbone_fingerprint(backbone)
        self._tasks: dict[str, str] = {}  # task -> current version
        self._resident: dict[str, AdapterHandle] = {}  # version -> handle
        self._subspaces: dict[str, Artifact] = {}  # version -> IPT decoder (host memory; not servable itself)

    # ---- registration ------------------------------------------------------------------------
    def register(self, task: str, data: bytes) -> Artifact:
        """Validate an artifact, make it resident, and point `task` at it. Nothing changes on error."""
        if task == BASE_TASK or not _TASK_NAME.match(task):
            raise InvalidRequestError(f"task names are 1-200 characters of letters, digits and ._:/- (not "
                                      f"{BASE_TASK!r}), found {task!r}")
        artifact = decode_artifact(data, expected_fingerprint=self.fingerprint, limits=self.limits,
                                   arch=self.backbone.arch)
        if artifact.kind == "subspace":
            self._subspaces[artifact.version] = artifact
        elif artifact.version not in self._resident:
            self._resident[artifact.version] = self._make_resident(artifact)
        previous = self._tasks.get(task)
        self._tasks[task] = artifact.version
        if previous is not None and previous != artifact.version:
            self._maybe_free(previous)
        return artifact

    def unregister(self, task: str) -> None:
        version = self._tasks.pop(task, None)
        if version is None:
            raise TaskNotFoundError(f"task {task!r} is not registered")
        self._maybe_free(version)

    def tasks(self) -> dict[str, str]:
        return dict(self._tasks)

    # ---- per request -------------------------------------------------------------------------
    def prefix_len(self, task: str | None) -> int:
        """Virtual tokens the task puts before the prompt (0 for the plain backbone)."""
        handle = self._handle(task)
        return handle.prefix_len if handle is not None else 0

    def acquire(self, task: str | None) -> AdapterHandle | None:
        """Pin the task's current version for one request."""
        handle = self._handle(task)
        if handle is not None:
            handle.num_users += 1
            self.pages.share(handle.prefix_pages)
        return handle

    def release(self, handle: AdapterHandle | None) -> None:
        if handle is None:
            return
        handle.num_users -= 1
        self.pages.free(handle.prefix_pages)
        self._maybe_free(handle.version)

    def _handle(self, task: str | None) -> AdapterHandle | None:
        if task is None or task == BASE_TASK:
            return None
        version = self._tasks.get(task)
        if version is None:
            raise TaskNotFoundError(f"task {task!r} is not registered")
        if version in self._subspaces:
            raise InvalidRequestError(f"task {task!r} is an IPT subspace (a shared decoder), not servable itself; "
                                      f"serve an intrinsic task that points at it")
        return self._resident[version]

    # ---- residency ---------------------------------------------------------------------------
    def _make_resident(self, artifact: Artifact) -> AdapterHandle:
        handle = AdapterHandle(artifact.version, artifact.kind)
        tensors = artifact.tensors
        if artifact.kind == "lora":
            handle.lora_slot = self._load_lora(artifact)
            return handle
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
            raise EngineOverloadedError(f"the KV pool has no room for a {num_tokens}-token prefix now; retry later")
        handle.prefix_pages, handle.prefix_len = self.pages.allocate(num_pages), num_tokens
        try:
            if artifact.kind == "prefix":
                self.runner.write_prefix(tensors["keys"], tensors["values"], handle.prefix_pages)
            else:
                self.runner.prefill_embeddings(embeddings, handle.prefix_pages)
        except Exception:
            self.pages.free(handle.prefix_pages)
            raise
        return handle

    def _decode_intrinsic(self, artifact: Artifact) -> torch.Tensor:
        subspace_version = artifact.config["subspace_version"]
        subspace = self._subspaces.get(subspace_version)
        if subspace is None:
            raise AdapterError(f"the intrinsic vector needs subspace {subspace_version}, which is not registered; "
                               f"upload the subspace artifact first")
        z = artifact.tensors["z"]
        expected = subspace.config["intrinsic_dim"]
        if z.shape != (expected,):
            raise AdapterError(f"subspace {subspace_version[:12]} decodes {expected}-dimensional vectors, found z of "
                               f"shape {tuple(z.shape)}")
        return get_kind("subspace").decode(subspace.tensors, z, subspace.config)  # [P, hidden]

    def _load_lora(self, artifact: Artifact) -> int:
        weights = {}
        for name, a in artifact.tensors.items():
            match = _LORA_KEY.match(name)
            if match:
                layer, target = int(match.group(1)), match.group(2)
                weights[(layer, target)] = (a, artifact.tensors[f"layers.{layer}.{target}.lora_b"])
        return self.runner.lora_slots.load(weights, get_kind("lora").scaling(artifact.config))

    def _maybe_free(self, version: str) -> None:
        if version in self._tasks.values():
            return
        self._subspaces.pop(version, None)
        handle = self._resident.get(version)
        if handle is None or handle.num_users:
            return
        del self._resident[version]
        self.pages.free(handle.prefix_pages)
        if handle.lora_slot >= 0:
            self.runner.lora_slots.free(handle.lora_slot)
