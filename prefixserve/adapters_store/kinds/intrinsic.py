"""Intrinsic Prompt Tuning tasks: a few floats decoded into a soft prompt by a shared subspace."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from prefixserve.adapters_store.finite import check_finite_in_dtype
from prefixserve.adapters_store.kinds.base import (
    SHA256_HEX,
    AdapterKind,
    DeviceTarget,
    Tensors,
    check_intrinsic_dim,
    check_tensors,
)
from prefixserve.adapters_store.kinds.subspace import SubspaceKind
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact


class IntrinsicKind(AdapterKind):
    """An IPT task: a d-dim vector z decoded by a shared subspace artifact (named by its version)."""

    name = "intrinsic"
    config_schema = {"subspace_version": str}

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> None:
        return None  # the subspace's P

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        version = config["subspace_version"]
        if not SHA256_HEX.fullmatch(version):
            raise AdapterError(f"intrinsic: expected subspace_version to be a sha256 hex digest (64 lowercase hex "
                               f"characters), found {version!r}")
        check_tensors(cls.name, tensors, {"z": (None,)})
        check_intrinsic_dim(cls.name, tensors["z"].shape[0], limits)

    @classmethod
    def requires(cls, config: dict) -> tuple[str, ...]:
        return (config["subspace_version"],)

    @classmethod
    def soft_prompt(cls, artifact: Artifact, device: DeviceTarget) -> torch.Tensor:
        """The soft prompt [P, hidden] its subspace decodes z into, finite in the engine's dtype."""
        subspace = device.required(artifact.config["subspace_version"])
        z = artifact.tensors["z"]
        expected = subspace.config["intrinsic_dim"]
        if z.shape != (expected,):
            raise AdapterError(f"subspace {subspace.version[:12]} decodes {expected}-dimensional vectors, found z "
                               f"of shape {tuple(z.shape)}")
        embeddings = SubspaceKind.decode(subspace.tensors, z, subspace.config)  # [P, hidden]
        check_finite_in_dtype("intrinsic", {f"the soft prompt decoded through subspace {subspace.version[:12]}":
                                            embeddings}, device.dtype)
        return embeddings

    @classmethod
    def check_servable(cls, artifact: Artifact, device: DeviceTarget) -> None:
        cls.soft_prompt(artifact, device)  # refuse a missing subspace or a soft prompt that overflows

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_soft_prompt(cls.soft_prompt(artifact, device))

    @classmethod
    def check_subspace(cls, tensors: Tensors, subspace_config: dict) -> None:
        """Refuse a z whose dimension is not the subspace's intrinsic_dim."""
        dim, expected = tensors["z"].shape[0], subspace_config["intrinsic_dim"]
        if dim != expected:
            raise AdapterError(f"intrinsic: expected z of the subspace's intrinsic_dim {expected}, found {dim}")
