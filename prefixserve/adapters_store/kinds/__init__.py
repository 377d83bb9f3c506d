"""The registry of adapter kinds: what each kind stores, how it is checked, and what it becomes on
the device. One module per kind; adding a kind is adding its module and its line in KINDS.

`validate` refuses anything that does not have exactly the kind's config keys and tensor
names/shapes, with an AdapterError that says what was expected and what was found. `arch` None
checks only what the artifact says about itself (used when encoding, before a backbone is known);
`limits` None skips the size limits. `compile` puts a version onto the device through the
engine's `DeviceTarget`, so the engine holds no per-kind branches.
"""

from prefixserve.adapters_store.kinds.base import AdapterKind, DeviceTarget, Shape, Tensors
from prefixserve.adapters_store.kinds.bitfit import BitFitKind
from prefixserve.adapters_store.kinds.bottleneck import BottleneckKind
from prefixserve.adapters_store.kinds.ia3 import IA3Kind
from prefixserve.adapters_store.kinds.intrinsic import IntrinsicKind
from prefixserve.adapters_store.kinds.lora import LORA_TARGETS, LoRAKind, lora_features
from prefixserve.adapters_store.kinds.prefix import PrefixKind
from prefixserve.adapters_store.kinds.prompt import PromptKind
from prefixserve.adapters_store.kinds.subspace import SubspaceKind
from prefixserve.errors import AdapterError

KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (PrefixKind, PromptKind, SubspaceKind, IntrinsicKind,
                                                            LoRAKind, IA3Kind, BitFitKind,
                                                            BottleneckKind)}


def get_kind(name: str) -> type[AdapterKind]:
    kind = KINDS.get(name)
    if kind is None:
        raise AdapterError(f"expected an adapter kind among {sorted(KINDS)}, found {name!r}")
    return kind


__all__ = ["KINDS", "LORA_TARGETS", "AdapterKind", "BitFitKind", "BottleneckKind", "DeviceTarget", "IA3Kind",
           "IntrinsicKind", "LoRAKind", "PrefixKind", "PromptKind", "Shape", "SubspaceKind", "Tensors", "get_kind",
           "lora_features"]
