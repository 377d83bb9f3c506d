"""Finiteness checks of adapter tensors, as stored and once cast to the dtype the engine holds them
in. A leaf module: format.py gates artifacts with them, and kinds check what they derive (a decoded
soft prompt) with them, while format.py imports the kinds' registry."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from prefixserve.errors import AdapterError


def all_finite(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> bool:
    """Whether every value is finite (after a cast to `dtype`, if given), in a few large ops rather than
    two small ones per tensor: a LoRA on every projection has hundreds of tensors, and each small op
    is a GIL round trip that competes with the engine thread while an upload is checked. Callers look
    tensor by tensor only when this fails, to name the bad one."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    for group in by_dtype.values():
        flat = torch.cat(group) if len(group) > 1 else group[0]
        if not bool(torch.isfinite(flat if dtype is None else flat.to(dtype)).all()):
            return False
    return True


def check_finite_in_dtype(kind: str, values: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Refuse a value that overflows once cast to what the engine holds it in: its dtype for weights,
    KV and activations, float32 for the LoRA scaling and decoded soft prompts. Finite in the file is
    not enough: 1e5 is a valid float32 but inf in float16."""
    for dtype_held in dict.fromkeys((torch.float32, dtype)):
        if all_finite(values.values(), dtype_held):
            continue
        for name, value in values.items():
            cast = value.to(dtype_held)
            if bool(torch.isfinite(cast).all()):
                continue
            if value.numel() == 1:
                found = f"{float(value):.6g}, which overflows"
            else:
                num_bad = int((~torch.isfinite(cast)).sum())
                found = (f"{num_bad} of its {value.numel()} values overflow (largest magnitude "
                         f"{float(value.double().abs().max()):.6g})")
            raise AdapterError(f"{kind}: expected {name} to be finite in {_dtype_name(dtype_held)} (the dtype the "
                               f"engine holds it in), found {found}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
