"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), kind "adapter": a small MLP with a
skip connection on a sublayer's output. Where a task places one, the sublayer's output y (attention's
after o_proj, the MLP's after down_proj) becomes

    y + up(act(down(y) + down_bias)) + up_bias

before the residual add. Houlsby places one after attention and one after the MLP, Pfeiffer only after
the MLP. Our own layout (peft has no bottleneck adapters): `layers.{i}.{placement}.{down, down_bias,
up, up_bias}`, down [size, hidden], up [hidden, size]."""

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
from prefixserve.errors import AdapterError
from prefixserve.kernels.bottleneck import ACTIVATION_FNS

if TYPE_CHECKING:
    from prefixserve.adapters_store.artifact import Artifact

PLACEMENTS = ("attention", "mlp")  # after the attention block's o_proj, after the MLP's down_proj
ACTIVATIONS = tuple(sorted(ACTIVATION_FNS))  # torch's (gelu: the exact erf form)
_PARTS = ("down", "down_bias", "up", "up_bias")
# Layer numbers without leading zeros: "layers.01" and "layers.1" would name one adapter twice.
_ADAPTER_NAME = re.compile(r"layers\.(0|[1-9]\d*)\.(" + "|".join(PLACEMENTS) + r")\.(" + "|".join(_PARTS) + ")")

# (layer, placement) -> (down [size, hidden], down_bias [size], up [hidden, size], up_bias [hidden])
BottleneckWeights = dict[tuple[int, str], tuple[Any, Any, Any, Any]]


class BottleneckKind(AdapterKind):
    """One bottleneck per (layer, placement) that has tensors; the others are left as they are."""

    name = "adapter"
    config_schema = {"size": int, "placements": list, "activation": str}

    @classmethod
    def weights(cls, tensors: Tensors) -> BottleneckWeights:
        """(layer, placement) -> (down, down_bias, up, up_bias) of a validated artifact."""
        out = {}
        for name in tensors:
            match = _ADAPTER_NAME.fullmatch(name)
            if match[3] == "down":
                stem = f"layers.{match[1]}.{match[2]}"
                out[(int(match[1]), match[2])] = tuple(tensors[f"{stem}.{part}"] for part in _PARTS)
        return out

    @classmethod
    def compile(cls, artifact: Artifact, device: DeviceTarget) -> Any:
        return device.install_bottleneck(cls.weights(artifact.tensors), artifact.config["activation"],
                                         artifact.config["size"])

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        size, placements, activation = config["size"], config["placements"], config["activation"]
        if size < 1 or (limits and size > limits.max_bottleneck_size):
            bound = f"1..{limits.max_bottleneck_size}" if limits else ">= 1"
            raise AdapterError(f"adapter: expected size {bound}, found {size}")
        if activation not in ACTIVATIONS:
            raise AdapterError(f"adapter: expected activation among {list(ACTIVATIONS)}, found {activation!r}")
        check_projection_names(cls.name, "placements", placements, PLACEMENTS)
        hidden = arch.hidden_size if arch else None

        def expect(match: re.Match) -> dict[str, Shape]:
            stem = f"layers.{int(match[1])}.{match[2]}"
            return {f"{stem}.down": (size, hidden), f"{stem}.down_bias": (size,),
                    f"{stem}.up": (hidden, size), f"{stem}.up_bias": (hidden,)}

        check_per_projection(cls.name, tensors, _ADAPTER_NAME, arch, expect,
                             "layers.<i>.<placement>.down / down_bias / up / up_bias", placements, "placements",
                             field="placements")
