"""BitFit (Ben Zaken et al. 2022): a task is bias vectors added to chosen projections' outputs. Llama's
projections have no biases of their own, so the task's are extra ones, trained from zero: the untrained
task is the backbone. Our own layout (peft has no BitFit type): `layers.{i}.{target}.bias`."""

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

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact

# Layer numbers without leading zeros: "layers.01" and "layers.1" would name one bias twice.
_BIAS_NAME = re.compile(r"layers\.(0|[1-9]\d*)\.(" + "|".join(LORA_TARGETS) + r")\.bias")


class BitFitKind(AdapterKind):
    """`layers.{i}.{target}.bias`: [out_features], added to that projection's output. Layers and
    projections without one are left as they are."""

    name = "bitfit"
    config_schema = {"targets": list}

    @classmethod
    def vectors(cls, tensors: Tensors) -> dict[tuple[int, str, str], Any]:
        """(layer, target, "shift_out") -> the bias, of a validated artifact."""
        out = {}
        for name, bias in tensors.items():
            match = _BIAS_NAME.fullmatch(name)
            out[(int(match[1]), match[2], "shift_out")] = bias
        return out

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_vectors(cls.vectors(artifact.tensors))

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        targets = config["targets"]
        check_projection_names(cls.name, "targets", targets, LORA_TARGETS)
        features = lora_features(arch) if arch else {}

        def expect(match: re.Match) -> dict[str, Shape]:
            return {match[0]: (features.get(match[2], (None, None))[1],)}  # the projection's out_features

        check_per_projection(cls.name, tensors, _BIAS_NAME, arch, expect, "layers.<i>.<target>.bias", targets,
                             "shifted projections")
