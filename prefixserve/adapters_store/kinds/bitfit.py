"""BitFit (Ben Zaken et al. 2022): a task is bias vectors added to chosen projections' outputs. Llama's
projections have no biases of their own, so the task's are extra ones, trained from zero: the untrained
task is the backbone. Our own layout (peft has no BitFit type): `layers.{i}.{target}.bias`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prefixserve.adapters_store.kinds.base import AdapterKind, DeviceTarget, Shape, Tensors, check_tensors
from prefixserve.adapters_store.kinds.lora import LORA_TARGETS, lora_features
from prefixserve.errors import AdapterError

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
        if (not all(isinstance(t, str) for t in targets) or targets != sorted(set(targets))
                or not set(targets) <= set(LORA_TARGETS)):
            raise AdapterError(f"bitfit: expected targets as a sorted list of distinct names from "
                               f"{list(LORA_TARGETS)}, found {targets}")
        features = lora_features(arch) if arch else {}
        expected: dict[str, Shape] = {}
        for name in tensors:
            match = _BIAS_NAME.fullmatch(name)
            if match is None:
                continue  # reported as unexpected by check_tensors
            layer, target = int(match[1]), match[2]
            if arch and layer >= arch.num_layers:
                raise AdapterError(f"bitfit: expected layer indices 0..{arch.num_layers - 1}, found {name!r}")
            expected[name] = (features.get(target, (None, None))[1],)  # the projection's out_features
        if not expected:
            raise AdapterError(f"bitfit: expected tensors named layers.<i>.<target>.bias, found {sorted(tensors)[:8]}")
        check_tensors(cls.name, tensors, expected)
        found_targets = sorted({name.split(".")[2] for name in expected})
        if found_targets != targets:
            raise AdapterError(f"bitfit: expected config targets to list the shifted projections {found_targets}, "
                               f"found {targets}")
