"""Preallocated device slots for LoRA weights (LoRAX / vLLM style): `load` writes an adapter into a
free slot, `free` zeroes it. Weights are stacked per target projection and indexed by slot, so the
batched LoRA op needs no pointer tables; a target's stack is allocated the first time an adapter
uses it, so attention-only deployments never pay for MLP stacks."""

from __future__ import annotations

import numpy as np
import torch

from prefixserve.errors import EngineOverloadedError
from prefixserve.kernels.lora import LoRASegment
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
        # Host copies, so building a step's segments never reads the device.
        self.ranks = [0] * num_slots
        self.scales = [0.0] * num_slots
        self.targets: list[frozenset[str]] = [frozenset()] * num_slots
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
        self.scales[slot] = scaling
        self.ranks[slot] = max(a.shape[0] for a, _ in weights.values())
        self.targets[slot] = frozenset(target for _, target in weights)
        return slot

    def free(self, slot: int) -> None:
        for stack_a, stack_b in self.stacks.values():
            stack_a[:, slot].zero_()
            stack_b[:, slot].zero_()
        self.scaling[slot] = 0.0
        self.ranks[slot], self.scales[slot], self.targets[slot] = 0, 0.0, frozenset()
        self._free.append(slot)

    def segments(self, token_slots, device: torch.device) -> dict[str, list[LoRASegment]]:
        """token_slots: numpy [num_tokens] slot per token (-1 none) -> per target, the segments of
        the slots whose adapter has that target."""
        by_target: dict[str, list[LoRASegment]] = {}
        for slot in np.unique(token_slots[token_slots >= 0]).tolist():
            rows = torch.from_numpy(np.flatnonzero(token_slots == slot)).to(device)
            segment = LoRASegment(rows, slot, self.ranks[slot], self.scales[slot])
            for target in self.targets[slot]:
                by_target.setdefault(target, []).append(segment)
        return by_target

    def _stack(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        if target not in self.stacks:
            fan_in, fan_out = target_features(self.arch, target)
            shape = (self.arch.num_layers, self.num_slots)
            self.stacks[target] = (
                torch.zeros(*shape, self.max_rank, fan_in, dtype=self.dtype, device=self.device),
                torch.zeros(*shape, fan_out, self.max_rank, dtype=self.dtype, device=self.device),
            )
        return self.stacks[target]
