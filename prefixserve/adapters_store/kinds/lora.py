"""LoRA: low-rank A, B per adapted projection."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

from prefixserve.adapters_store.kinds.base import (
    AdapterKind,
    DeviceTarget,
    Shape,
    Tensors,
    check_per_projection,
    check_projection_names,
)
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact
    from prefixserve.models.llama import LlamaArch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_NAME = re.compile(r"layers\.(\d+)\.(" + "|".join(LORA_TARGETS) + r")\.lora_(a|b)")


def lora_features(arch: LlamaArch) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection LoRA may adapt."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


class LoRAKind(AdapterKind):
    """Low-rank A, B per adapted (layer, projection); delta W = scaling * B @ A."""

    name = "lora"
    config_schema = {"rank": int, "alpha": (int, float), "use_rslora": bool, "targets": list}

    @classmethod
    def scaling(cls, config: dict) -> float:
        rank = config["rank"]
        return config["alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)

    @classmethod
    def weights(cls, tensors: Tensors) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, target) -> (A [r, in], B [out, r]) of a validated artifact."""
        out = {}
        for name, a in tensors.items():
            match = _LORA_NAME.fullmatch(name)
            if match and match[3] == "a":
                layer, target = int(match[1]), match[2]
                out[(layer, target)] = (a, tensors[f"layers.{layer}.{target}.lora_b"])
        return out

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_lora(cls.weights(artifact.tensors), cls.scaling(artifact.config), artifact.config["rank"])

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
        check_projection_names(cls.name, "targets", targets, LORA_TARGETS)
        features = lora_features(arch) if arch else {}

        def expect(match: re.Match) -> dict[str, Shape]:
            layer, target = int(match[1]), match[2]  # "layers.01" expects "layers.1": refused as unexpected
            fan_in, fan_out = features.get(target, (None, None))
            return {f"layers.{layer}.{target}.lora_a": (rank, fan_in),  # A: [r, in_features]
                    f"layers.{layer}.{target}.lora_b": (fan_out, rank)}  # B: [out_features, r]

        check_per_projection(cls.name, tensors, _LORA_NAME, arch, expect, "layers.<i>.<target>.lora_a / lora_b",
                             targets, "adapted projections")
