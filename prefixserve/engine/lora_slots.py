"""Preallocated device slots for LoRA weights (LoRAX / vLLM style): `load` writes an adapter into a
free slot, `free` zeroes it. Weights are stacked per target projection and indexed by slot, so the
batched LoRA op needs no pointer tables; a target's stack is allocated the first time an adapter
uses it, so attention-only deployments never pay for MLP stacks."""

from __future__ import annotations

import torch

from prefixserve.errors import EngineOverloadedError
from prefixserve.models.llama import LlamaArch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_features(arch: LlamaArch, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {
        "q_proj": (arch.hidden_size, q_out), "k_proj": (arch.hidden_size, kv_out),
        "v_proj": (arch.hidden_size, kv_out), "o_proj": (q_out, arch.hidden_size),
        "gate_proj": (arch.hidden_size, arch.intermediate_size), "up_proj": (arch.hidden_size, arch.intermediate_size),
        "down_proj": (arch.intermediate_size, arch.hidden_size),
    }[target]


class LoRASlots:
    def __init__(self, arch: LlamaArch, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.arch, self.num_slots, self.max_rank = arch, num_slots, max_rank
        self.dtype, self.device = dtype, device
        # per target: a [num_layers, num_slots, max_rank, in], b [num_layers, num_slots, out, max_rank]
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scaling = torch.zeros(num_slots, dtype=torch.float32, device=device)  # [num_slots]
        self._free = list(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def load(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float) -> int:
        """weights: (layer, target) -> (A [r, in], B [out, r]). Returns the slot."""
        if not self._free:
            raise EngineOverloadedError(f"all {self.num_slots} LoRA slots hold adapters in use; retry when one ends")
        slot = self._free.pop()
        for (layer, target), (a, b) in weights.items():
            stack_a, stack_b = self._stack(target)
            rank = a.shape[0]
            # Ranks below max_rank stay zero-padded: the padded rows/columns contribute nothing.
            stack_a[layer, slot, :rank] = a.to(self.dtype)
            stack_b[layer, slot, :, :rank] = b.to(self.dtype)
        self.scaling[slot] = scaling
        return slot

    def free(self, slot: int) -> None:
        for stack_a, stack_b in self.stacks.values():
            stack_a[:, slot].zero_()
            stack_b[:, slot].zero_()
        self.scaling[slot] = 0.0
        self._free.append(slot)

    def layer(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The stacks of one layer: target -> (a [num_slots, max_rank, in], b [num_slots, out, max_rank])."""
        return {t: (a[index], b[index]) for t, (a, b) in self.stacks.items()}

    def _stack(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        if target not in self.stacks:
            fan_in, fan_out = target_features(self.arch, target)
            shape = (self.arch.num_layers, self.num_slots)
            self.stacks[target] = (
                torch.zeros(*shape, self.max_rank, fan_in, dtype=self.dtype, device=self.device),
                torch.zeros(*shape, fan_out, self.max_rank, dtype=self.dtype, device=self.device),
            )
        return self.stacks[target]
