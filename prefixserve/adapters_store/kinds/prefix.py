"""Prefix tuning: a KV prefix per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefixserve.adapters_store.kinds.base import (
    DeviceTarget,
    VirtualTokensKind,
    check_tensors,
    check_virtual_tokens,
    fmt,
)
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact


class PrefixKind(VirtualTokensKind):
    """Per-layer KV prefix, exactly as it sits in the KV cache: written as-is, no RoPE applied to it
    (peft learns it in cache space); the request's own tokens then start at position P."""

    name = "prefix"

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_kv_prefix(artifact.tensors["keys"], artifact.tensors["values"])

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        # keys, values: [L, P, Hkv, D]
        shape = ((arch.num_layers, num_tokens, arch.num_kv_heads, arch.head_dim) if arch
                 else (None, num_tokens, None, None))
        check_tensors(cls.name, tensors, {"keys": shape, "values": shape})
        if tensors["keys"].shape != tensors["values"].shape:
            raise AdapterError(f"prefix: expected values of the same shape as keys {fmt(tensors['keys'].shape)}, "
                               f"found {fmt(tensors['values'].shape)}")
