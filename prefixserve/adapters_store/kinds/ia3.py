"""IA3 ((IA)^3, T-Few): learned vectors that rescale chosen projections, as peft applies them: a
projection's output times its vector, or for a `feedforward` projection its input times the vector
before the matmul. Initialised at ones, so the untrained task is the backbone."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prefixserve.adapters_store.kinds.base import (
    AdapterKind,
    DeviceTarget,
    Shape,
    Tensors,
    check_per_projection,
    check_projection_names,
)
from prefixserve.adapters_store.kinds.lora import LORA_TARGETS, lora_features
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact

# Layer numbers without leading zeros: "layers.01" and "layers.1" would name one vector twice.
_IA3_NAME = re.compile(r"layers\.(0|[1-9]\d*)\.(" + "|".join(LORA_TARGETS) + r")\.ia3")


class IA3Kind(AdapterKind):
    """`layers.{i}.{target}.ia3`: [in_features] for a feedforward target (scales its input), else
    [out_features] (scales its output). Layers without a vector are left as they are."""

    name = "ia3"
    config_schema = {"targets": list, "feedforward": list}

    @classmethod
    def vectors(cls, config: dict, tensors: Tensors) -> dict[tuple[int, str, str], Any]:
        """(layer, target, "scale_in" | "scale_out") -> the vector, of a validated artifact."""
        feedforward = set(config["feedforward"])
        out = {}
        for name, vector in tensors.items():
            match = _IA3_NAME.fullmatch(name)
            layer, target = int(match[1]), match[2]
            out[(layer, target, "scale_in" if target in feedforward else "scale_out")] = vector
        return out

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_vectors(cls.vectors(artifact.config, artifact.tensors))

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        targets, feedforward = config["targets"], config["feedforward"]
        check_projection_names(cls.name, "targets", targets, LORA_TARGETS)
        check_projection_names(cls.name, "feedforward", feedforward, LORA_TARGETS)
        if not set(feedforward) <= set(targets):
            raise AdapterError(f"ia3: expected feedforward to be among targets {targets}, found {feedforward}")
        features = lora_features(arch) if arch else {}

        def expect(match: re.Match) -> dict[str, Shape]:
            fan_in, fan_out = features.get(match[2], (None, None))
            return {match[0]: (fan_in if match[2] in feedforward else fan_out,)}

        check_per_projection(cls.name, tensors, _IA3_NAME, arch, expect, "layers.<i>.<target>.ia3", targets,
                             "scaled projections")
