"""The registry of adapter kinds: what each kind stores and how it is checked.

A kind is a class, registered by name in KINDS; `validate` refuses anything that does not have
exactly the kind's config keys and tensor names/shapes, with an AdapterError that says what was
expected and what was found. `arch` None checks only what the artifact says about itself (used
when encoding, before a backbone is known); `limits` None skips the size limits.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.config import AdapterLimits
    from prefixserve.models.llama import LlamaArch

Tensors = dict[str, torch.Tensor]
Shape = tuple[int | None, ...]  # None: any size (not known without the backbone)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_NAME = re.compile(r"layers\.(\d+)\.(" + "|".join(LORA_TARGETS) + r")\.lora_(a|b)")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def lora_features(arch: LlamaArch) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection LoRA may adapt."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


class AdapterKind:
    """Base of every kind. Subclasses set `name` and `config_schema` and implement `_check`."""

    name: ClassVar[str]
    config_schema: ClassVar[dict[str, type | tuple[type, ...]]]

    @classmethod
    def validate(cls, config: dict, tensors: Tensors, arch: LlamaArch | None, limits: AdapterLimits | None) -> None:
        """Raise AdapterError unless config and tensors are exactly this kind's (and fit arch and limits)."""
        _check_config(cls.name, config, cls.config_schema)
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
    def _check(cls, config: dict, tensors: Tensors, arch: LlamaArch | None, limits: AdapterLimits | None) -> None:
        raise NotImplementedError


class _VirtualTokensKind(AdapterKind):
    """A kind whose config is just its number of virtual tokens P."""

    config_schema = {"num_virtual_tokens": int}

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> int:
        return config["num_virtual_tokens"]


class PrefixKind(_VirtualTokensKind):
    """Per-layer KV prefix, exactly as it sits in the KV cache: written as-is, no RoPE applied to it
    (peft learns it in cache space); the request's own tokens then start at position P."""

    name = "prefix"

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = _check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        # keys, values: [L, P, Hkv, D]
        shape = ((arch.num_layers, num_tokens, arch.num_kv_heads, arch.head_dim) if arch
                 else (None, num_tokens, None, None))
        _check_tensors(cls.name, tensors, {"keys": shape, "values": shape})
        if tensors["keys"].shape != tensors["values"].shape:
            raise AdapterError(f"prefix: expected values of the same shape as keys {_fmt(tensors['keys'].shape)}, "
                               f"found {_fmt(tensors['values'].shape)}")


class PromptKind(_VirtualTokensKind):
    """P soft-prompt embeddings, fed in front of the request (prompt tuning; P-tuning collapses here)."""

    name = "prompt"

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = _check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        _check_tensors(cls.name, tensors, {"embeddings": (num_tokens, arch.hidden_size if arch else None)})


class SubspaceKind(AdapterKind):
    """IPT shared decoder z -> soft prompt: linear d->Hd, tanh, linear Hd->P*hidden. Optionally carries
    `source_vectors` [N, d]: the z of the tasks it was fit on, where IST can start a new task."""

    name = "subspace"
    config_schema = {"intrinsic_dim": int, "num_virtual_tokens": int, "decoder_hidden": int}

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> int:
        return config["num_virtual_tokens"]

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = _check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        dim = _check_intrinsic_dim(cls.name, config["intrinsic_dim"], limits)
        decoder_hidden = config["decoder_hidden"]
        if decoder_hidden < 1:
            raise AdapterError(f"subspace: expected decoder_hidden >= 1, found {decoder_hidden}")
        out = num_tokens * arch.hidden_size if arch else None
        _check_tensors(cls.name, tensors, {
            "decoder.0.weight": (decoder_hidden, dim), "decoder.0.bias": (decoder_hidden,),
            "decoder.2.weight": (out, decoder_hidden), "decoder.2.bias": (out,),
        }, optional={"source_vectors": (None, dim)})
        rows, bias = tensors["decoder.2.weight"].shape[0], tensors["decoder.2.bias"].shape[0]
        if rows % num_tokens or bias != rows:
            raise AdapterError(f"subspace: expected decoder.2 to output num_virtual_tokens ({num_tokens}) x hidden "
                               f"values with a bias of the same size, found weight rows {rows} and bias {bias}")

    @classmethod
    def decode(cls, tensors: Tensors, z: torch.Tensor, config: dict) -> torch.Tensor:
        """z: [d] -> soft prompt [P, hidden] in fp32 (config: this subspace artifact's config)."""
        if tuple(z.shape) != (config["intrinsic_dim"],):
            raise AdapterError(f"subspace: expected z of shape [{config['intrinsic_dim']}], found {_fmt(z.shape)}")
        w0, b0 = tensors["decoder.0.weight"].float(), tensors["decoder.0.bias"].float()  # [Hd, d], [Hd]
        w2, b2 = tensors["decoder.2.weight"].float(), tensors["decoder.2.bias"].float()  # [P*hidden, Hd], [P*hidden]
        hidden = torch.tanh(F.linear(z.to(w0.device, torch.float32), w0, b0))  # [Hd]
        return F.linear(hidden, w2, b2).view(config["num_virtual_tokens"], -1)  # [P, hidden]

    @classmethod
    def derived_values(cls, config: dict, tensors: Tensors) -> Tensors:
        # IST starts a task at one of the source vectors: its soft prompt must be servable too.
        if "source_vectors" not in tensors:
            return {}
        return {f"the soft prompt decoded from source_vectors[{i}]": cls.decode(tensors, z, config)
                for i, z in enumerate(tensors["source_vectors"])}


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
        if not _SHA256_HEX.fullmatch(version):
            raise AdapterError(f"intrinsic: expected subspace_version to be a sha256 hex digest (64 lowercase hex "
                               f"characters), found {version!r}")
        _check_tensors(cls.name, tensors, {"z": (None,)})
        _check_intrinsic_dim(cls.name, tensors["z"].shape[0], limits)

    @classmethod
    def check_subspace(cls, tensors: Tensors, subspace_config: dict) -> None:
        """Refuse a z whose dimension is not the subspace's intrinsic_dim."""
        dim, expected = tensors["z"].shape[0], subspace_config["intrinsic_dim"]
        if dim != expected:
            raise AdapterError(f"intrinsic: expected z of the subspace's intrinsic_dim {expected}, found {dim}")


class LoRAKind(AdapterKind):
    """Low-rank A, B per adapted (layer, projection); delta W = scaling * B @ A."""

    name = "lora"
    config_schema = {"rank": int, "alpha": (int, float), "use_rslora": bool, "targets": list}

    @classmethod
    def scaling(cls, config: dict) -> float:
        rank = config["rank"]
        return config["alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)

    @classmethod
    def derived_values(cls, config: dict, tensors: Tensors) -> Tensors:
        # A finite alpha can still give a scaling past float32's range (alpha 1e308 / rank 8), which
        # the LoRA metadata's float32 scaling cannot hold: computed here in float64, checked after the cast.
        rank = f"sqrt(rank {config['rank']})" if config["use_rslora"] else f"rank {config['rank']}"
        return {f"scaling (alpha {config['alpha']:g} / {rank})": torch.tensor(cls.scaling(config),
                                                                           dtype=torch.float64)}

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        rank, targets = config["rank"], config["targets"]
        if rank < 1 or (limits and rank > limits.max_lora_rank):
            bound = f"1..{limits.max_lora_rank}" if limits else ">= 1"
            raise AdapterError(f"lora: expected rank {bound}, found {rank}")
        if not math.isfinite(config["alpha"]):
            raise AdapterError(f"lora: expected a finite alpha, found {config['alpha']}")
        if (not all(isinstance(t, str) for t in targets) or targets != sorted(set(targets))
                or not set(targets) <= set(LORA_TARGETS)):
            raise AdapterError(f"lora: expected targets as a sorted list of distinct names from {list(LORA_TARGETS)}, "
                               f"found {targets}")
        features = lora_features(arch) if arch else {}
        expected: dict[str, Shape] = {}
        for name in tensors:
            match = _LORA_NAME.fullmatch(name)
            if match is None:
                continue  # reported as unexpected by _check_tensors
            layer, target = int(match[1]), match[2]
            if arch and layer >= arch.num_layers:
                raise AdapterError(f"lora: expected layer indices 0..{arch.num_layers - 1}, found {name!r}")
            fan_in, fan_out = features.get(target, (None, None))
            expected[f"layers.{layer}.{target}.lora_a"] = (rank, fan_in)  # A: [r, in_features]
            expected[f"layers.{layer}.{target}.lora_b"] = (fan_out, rank)  # B: [out_features, r]
        if not expected:
            raise AdapterError(f"lora: expected tensors named layers.<i>.<target>.lora_a / lora_b, "
                               f"found {sorted(tensors)[:8]}")
        _check_tensors(cls.name, tensors, expected)
        found_targets = sorted({name.split(".")[2] for name in expected})
        if found_targets != targets:
            raise AdapterError(f"lora: expected config targets to list the adapted projections {found_targets}, "
                               f"found {targets}")


KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (PrefixKind, PromptKind, SubspaceKind, IntrinsicKind,
                                                            LoRAKind)}


def get_kind(name: str) -> type[AdapterKind]:
    kind = KINDS.get(name)
    if kind is None:
        raise AdapterError(f"expected an adapter kind among {sorted(KINDS)}, found {name!r}")
    return kind


def _check_config(kind: str, config: dict, schema: dict) -> None:
    if not isinstance(config, dict) or set(config) != set(schema):
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{kind}: expected config keys {sorted(schema)}, found {found}")
    for key, types in schema.items():
        value = config[key]
        # bool is an int subclass in Python; a true/false where a number belongs is a producer bug
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise AdapterError(f"{kind}: expected config {key!r} of type {names}, found {value!r}")


def _check_virtual_tokens(kind: str, num_tokens: int, limits: AdapterLimits | None) -> int:
    if num_tokens < 1 or (limits and num_tokens > limits.max_virtual_tokens):
        bound = f"1..{limits.max_virtual_tokens}" if limits else ">= 1"
        raise AdapterError(f"{kind}: expected num_virtual_tokens {bound}, found {num_tokens}")
    return num_tokens


def _check_intrinsic_dim(kind: str, dim: int, limits: AdapterLimits | None) -> int:
    if dim < 1 or (limits and dim > limits.max_intrinsic_dim):
        bound = f"1..{limits.max_intrinsic_dim}" if limits else ">= 1"
        raise AdapterError(f"{kind}: expected intrinsic dim {bound}, found {dim}")
    return dim


def _check_tensors(kind: str, tensors: Tensors, expected: dict[str, Shape],
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
            raise AdapterError(f"{kind}: expected {name} of shape {_fmt(shape)}, found {_fmt(found)}")


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
