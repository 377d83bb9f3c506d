"""Prompt tuning (and P-tuning, whose encoder output PEFT saves): soft-prompt embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefixserve.adapters_store.kinds.base import DeviceTarget, VirtualTokensKind, check_tensors, check_virtual_tokens

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact


class PromptKind(VirtualTokensKind):
    """P soft-prompt embeddings, fed in front of the request (prompt tuning; P-tuning collapses here)."""

    name = "prompt"

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_soft_prompt(artifact.tensors["embeddings"])

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        check_tensors(cls.name, tensors, {"embeddings": (num_tokens, arch.hidden_size if arch else None)})
