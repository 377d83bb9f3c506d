"""What every adapter kind has: the base class, the device interface kinds compile through, and the
shared checks that say what was expected and what was found."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact
    from prefixserve.config import AdapterLimits
    from prefixserve.models.llama import LlamaArch

Tensors = dict[str, torch.Tensor]
Shape = tuple[int | None, ...]  # None: any size (not known without the backbone)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class DeviceTarget(Protocol):
    """What a kind's compile may ask of the engine (engine/residency.py implements it): kinds say
    what their tensors become, the engine owns pages, pool rows and eviction. A new kind that needs
    a new kind of device state adds a method here."""

    dtype: torch.dtype  # the engine's: values derived on the way in are checked in it

    def required(self, version: str) -> Artifact:
        """A decoded artifact this one requires (`AdapterKind.requires`), from the host cache or store."""

    def install_kv_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> Any:
        """keys, values: [L, P, Hkv, D], written as they are into shared KV pages."""

    def install_soft_prompt(self, embeddings: torch.Tensor) -> Any:
        """embeddings: [P, hidden], prefilled once through the backbone into shared KV pages."""

    def install_lora(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float,
                     rank: int) -> Any:
        """(layer, target) -> (A [r, in], B [out, r]) into the LoRA pool."""

    def install_bottleneck(self, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], activation: str,
                           size: int) -> Any:
        """(layer, placement) -> (down [size, hidden], down_bias [size], up [hidden, size], up_bias
        [hidden]) into the bottleneck pool (engine/bottleneck_pool.py)."""

    def install_vectors(self, vectors: dict[tuple[int, str, str], torch.Tensor]) -> Any:
        """(layer, target, mode) -> a vector over the projection's input ("scale_in": multiplies it
        before the matmul) or output ("scale_out": multiplies it; "shift_out": adds to it), into the
        vector pool (engine/vector_pool.py)."""


class AdapterKind:
    """Base of every kind. Subclasses set `name` and `config_schema` and implement `_check`."""

    name: ClassVar[str]
    config_schema: ClassVar[dict[str, type | tuple[type, ...]]]
    servable: ClassVar[bool] = True  # False: shared data other kinds name (a subspace), never a task itself

    @classmethod
    def validate(cls, config: dict, tensors: Tensors, arch: LlamaArch | None, limits: AdapterLimits | None) -> None:
        """Raise AdapterError unless config and tensors are exactly this kind's (and fit arch and limits)."""
        check_config(cls.name, config, cls.config_schema)
        cls._check(config, tensors, arch, limits)

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> int | None:
        """Soft-prompt / KV-prefix length P; 0 for kinds without one; None when another artifact decides."""
        return 0

    @classmethod
    def derived_values(cls, config: dict, tensors: Tensors) -> Tensors:
        """Values the engine computes from a valid artifact besides its stored tensors (in float64 or
        float32, before any cast), named for error messages; format.py checks they survive the cast."""
        return {}

    @classmethod
    def requires(cls, config: dict) -> tuple[str, ...]:
        """Versions of other artifacts this one needs to be served (kept in the store with it)."""
        return ()

    @classmethod
    def check_servable(cls, artifact: Artifact, device: DeviceTarget) -> None:
        """At upload, before anything is stored: refuse what validation alone cannot see (what the
        artifacts it requires make of it). The engine's compile may find no room now; this may not."""

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        """Put a validated version onto the device through `device`; returns its placement."""
        raise AdapterError(f"kind {cls.name!r} cannot be served")

    @classmethod
    def _check(cls, config: dict, tensors: Tensors, arch: LlamaArch | None, limits: AdapterLimits | None) -> None:
        raise NotImplementedError


class VirtualTokensKind(AdapterKind):
    """A kind whose config is just its number of virtual tokens P."""

    config_schema = {"num_virtual_tokens": int}

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> int:
        return config["num_virtual_tokens"]


def check_config(kind: str, config: dict, schema: dict) -> None:
    if not isinstance(config, dict) or set(config) != set(schema):
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{kind}: expected config keys {sorted(schema)}, found {found}")
    for key, types in schema.items():
        value = config[key]
        # bool is an int subclass in Python; a true/false where a number belongs is a producer bug
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise AdapterError(f"{kind}: expected config {key!r} of type {names}, found {value!r}")


def check_virtual_tokens(kind: str, num_tokens: int, limits: AdapterLimits | None) -> int:
    if num_tokens < 1 or (limits and num_tokens > limits.max_virtual_tokens):
        bound = f"1..{limits.max_virtual_tokens}" if limits else ">= 1"
        raise AdapterError(f"{kind}: expected num_virtual_tokens {bound}, found {num_tokens}")
    return num_tokens


def check_intrinsic_dim(kind: str, dim: int, limits: AdapterLimits | None) -> int:
    if dim < 1 or (limits and dim > limits.max_intrinsic_dim):
        bound = f"1..{limits.max_intrinsic_dim}" if limits else ">= 1"
        raise AdapterError(f"{kind}: expected intrinsic dim {bound}, found {dim}")
    return dim


def check_tensors(kind: str, tensors: Tensors, expected: dict[str, Shape],
                   optional: dict[str, Shape] | None = None) -> None:
    """Exactly the expected names (plus any of the optional ones), each with its shape (None matches
    any size)."""
    optional = optional or {}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if missing or unexpected:
        allowed = sorted(expected)[:16] + [f"{name} (optional)" for name in sorted(optional)]
        raise AdapterError(f"{kind}: expected tensors {allowed}, found missing {missing[:8]} and "
                           f"unexpected {unexpected[:8]}")
    shapes = {**expected, **{name: shape for name, shape in optional.items() if name in tensors}}
    for name, shape in shapes.items():
        found = tuple(tensors[name].shape)
        if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
            raise AdapterError(f"{kind}: expected {name} of shape {fmt(shape)}, found {fmt(found)}")


def check_projection_names(kind: str, field: str, names: list, allowed: tuple[str, ...]) -> None:
    """A config list of projections: sorted, distinct, each one of `allowed`."""
    if not all(isinstance(t, str) for t in names) or names != sorted(set(names)) or not set(names) <= set(allowed):
        raise AdapterError(f"{kind}: expected {field} as a sorted list of distinct names from {list(allowed)}, "
                           f"found {names}")


def check_per_projection(kind: str, tensors: Tensors, pattern: re.Pattern, arch: LlamaArch | None,
                         expect: Callable[[re.Match], dict[str, Shape]], named: str, targets: list,
                         what: str, field: str = "targets") -> None:
    """Tensors named per (layer, projection) by `pattern` (groups: layer, projection, ...): every layer
    in range, exactly the names and shapes `expect(match)` gives for each match (so a missing partner
    shows), and config `field` (`targets`) listing exactly the projections (or placements) found."""
    expected: dict[str, Shape] = {}
    for name in tensors:
        match = pattern.fullmatch(name)
        if match is None:
            continue  # reported as unexpected by check_tensors
        if arch and int(match[1]) >= arch.num_layers:
            raise AdapterError(f"{kind}: expected layer indices 0..{arch.num_layers - 1}, found {name!r}")
        expected |= expect(match)
    if not expected:
        raise AdapterError(f"{kind}: expected tensors named {named}, found {sorted(tensors)[:8]}")
    check_tensors(kind, tensors, expected)
    found = sorted({name.split(".")[2] for name in expected})
    if found != targets:
        raise AdapterError(f"{kind}: expected config {field} to list the {what} {found}, found {targets}")


def fmt(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
