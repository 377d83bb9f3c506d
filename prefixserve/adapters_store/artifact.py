"""A decoded task artifact: plain data, in its own module so the kinds name it without importing
format.py, which imports their registry."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Artifact:
    kind: str  # registered kind name (kinds.KINDS)
    config: dict  # the kind's config (JSON-able)
    tensors: dict[str, torch.Tensor]  # CPU, fp32/fp16/bf16 as stored
    fingerprint: dict  # backbone fingerprint it was made for
    version: str  # sha256 hex of the artifact bytes
    num_bytes: int
