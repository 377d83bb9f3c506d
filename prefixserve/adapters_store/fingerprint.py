"""Backbone fingerprint: the facts an artifact must agree with to be served on a backbone.

Shapes alone do not identify a backbone (two fine-tunes of one base share every shape), so the
fingerprint also holds the sha256 of the input embedding matrix: a prefix or LoRA trained on
another checkpoint is refused instead of producing confident nonsense.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # adapters_store sits below models/: it needs their shapes, not their code
    from prefixserve.models.llama import LlamaArch
    from prefixserve.models.loader import Backbone

# Backbone does not record the Hugging Face class name; every backbone we load runs the same
# Llama-family forward, so this is the name used when the backbone does not say otherwise.
DEFAULT_ARCHITECTURE = "LlamaForCausalLM"

FINGERPRINT_FIELDS = ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "vocab_size", "embedding_sha256")


def backbone_fingerprint(backbone: Backbone) -> dict:
    """The fingerprint of a loaded backbone (hashes its embedding once: call it once per load)."""
    architecture = getattr(backbone, "architecture", None) or DEFAULT_ARCHITECTURE
    return fingerprint_from_parts(backbone.arch, backbone.model.embed_tokens.weight, architecture)


def fingerprint_from_parts(
    arch: LlamaArch, embed_weight: torch.Tensor, architecture: str = DEFAULT_ARCHITECTURE
) -> dict:
    """The same fingerprint from its parts, e.g. for a transformers model being trained."""
    return {
        "architecture": architecture,
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_heads": arch.num_heads,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "embedding_sha256": embedding_sha256(embed_weight),
    }


def embedding_sha256(embed_weight: torch.Tensor) -> str:
    """sha256 of the embedding as contiguous fp32 bytes. A backbone served in fp16/bf16 hashes its
    rounded weights, so it differs from the fp32 load of the same checkpoint."""
    # embed_weight: [vocab, hidden]
    weight = embed_weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(weight.numpy()).hexdigest()


def fingerprint_differences(expected: dict, found: dict) -> list[str]:
    """Human-readable 'field: expected X, found Y' for every field that differs (empty: they match)."""
    fields = list(FINGERPRINT_FIELDS) + sorted((set(expected) | set(found)) - set(FINGERPRINT_FIELDS))
    def show(fingerprint: dict, name: str) -> str:
        return repr(fingerprint[name]) if name in fingerprint else "<missing>"

    return [f"{name}: expected {show(expected, name)}, found {show(found, name)}"
            for name in fields if show(expected, name) != show(found, name)]
