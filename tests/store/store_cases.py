"""Artifacts and PEFT adapters for the store tests (tests/store is on sys.path for its modules)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save

from prefixserve.adapters_store.fingerprint import fingerprint_from_parts
from prefixserve.adapters_store.kinds import LORA_TARGETS, lora_features
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_hf_model, tiny_llama_config

TINY_ARCH = LlamaArch.from_hf_config(tiny_llama_config())  # L=2, hidden 64, H=4, Hkv=2, D=16, inter 128
SUBSPACE_VERSION = "ab" * 32


def hf_fingerprint(hf_model) -> dict:
    return fingerprint_from_parts(LlamaArch.from_hf_config(hf_model.config), hf_model.model.embed_tokens.weight)


def valid_parts(kind: str, arch: LlamaArch = TINY_ARCH, seed: int = 0, dtype=torch.float32) -> tuple[dict, dict]:
    """(config, tensors) of a valid artifact of `kind` for `arch`, random and non-zero."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    L, Hkv, D, hidden, P = arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.hidden_size, 4
    if kind == "prefix":
        return {"num_virtual_tokens": P}, {"keys": rand(L, P, Hkv, D), "values": rand(L, P, Hkv, D)}
    if kind == "prompt":
        return {"num_virtual_tokens": P}, {"embeddings": rand(P, hidden)}
    if kind == "subspace":
        d, Hd = 5, 8
        return ({"intrinsic_dim": d, "num_virtual_tokens": P, "decoder_hidden": Hd},
                {"decoder.0.weight": rand(Hd, d), "decoder.0.bias": rand(Hd),
                 "decoder.2.weight": rand(P * hidden, Hd), "decoder.2.bias": rand(P * hidden)})
    if kind == "intrinsic":
        return {"subspace_version": SUBSPACE_VERSION}, {"z": rand(5)}
    if kind == "lora":
        r, features, tensors = 4, lora_features(arch), {}
        for i in range(L):
            for t in LORA_TARGETS:
                fan_in, fan_out = features[t]
                tensors[f"layers.{i}.{t}.lora_a"] = rand(r, fan_in)
                tensors[f"layers.{i}.{t}.lora_b"] = rand(fan_out, r)
        return {"rank": r, "alpha": 8.0, "use_rslora": False, "targets": sorted(LORA_TARGETS)}, tensors
    if kind == "ia3":  # output scales on k, v; down_proj's input (peft's default for Llama)
        features, tensors = lora_features(arch), {}
        for i in range(L):
            for t, side in (("k_proj", 1), ("v_proj", 1), ("down_proj", 0)):
                tensors[f"layers.{i}.{t}.ia3"] = 1 + 0.3 * rand(features[t][side])
        return {"targets": ["down_proj", "k_proj", "v_proj"], "feedforward": ["down_proj"]}, tensors
    if kind == "bitfit":  # every projection in layer 0; q (a part of the fused q/k/v) and down_proj elsewhere
        features, tensors = lora_features(arch), {}
        for i in range(L):
            for t in LORA_TARGETS if i == 0 else ("q_proj", "down_proj"):
                tensors[f"layers.{i}.{t}.bias"] = 0.3 * rand(features[t][1])
        return {"targets": sorted(LORA_TARGETS)}, tensors
    if kind == "adapter":  # Houlsby (after attention and the MLP) in layer 0, Pfeiffer (the MLP only) elsewhere
        tensors, size, hidden = {}, 3, arch.hidden_size
        for i in range(L):
            for placement in ("attention", "mlp") if i == 0 else ("mlp",):
                stem = f"layers.{i}.{placement}"
                tensors |= {f"{stem}.down": 0.3 * rand(size, hidden), f"{stem}.down_bias": 0.3 * rand(size),
                            f"{stem}.up": 0.3 * rand(hidden, size), f"{stem}.up_bias": 0.3 * rand(hidden)}
        return {"size": size, "placements": ["attention", "mlp"], "activation": "gelu"}, tensors
    raise ValueError(kind)


def raw_artifact(tensors: dict, metadata: dict) -> bytes:
    """Bytes with exactly this metadata, bypassing encode_artifact's checks (to test decode's)."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def raw_metadata(kind: str, config: dict, fingerprint: dict, overrides: dict | None = None) -> dict:
    """Metadata as encode_artifact writes it; `overrides` replaces strings (None drops the key)."""
    metadata = {"format_version": "1", "kind": kind, "config": json.dumps(config),
                "backbone": json.dumps(fingerprint)}
    metadata.update(overrides or {})
    return {k: v for k, v in metadata.items() if v is not None}


def save_peft(out_dir: Path, peft_config, seed: int = 0, **model_overrides):
    """Build a tiny model, wrap it with peft, save the adapter; returns the (training-mode) PeftModel."""
    from peft import get_peft_model

    # peft fills num_layers, token_dim, ... into the config object it is given: use a fresh copy
    peft_model = get_peft_model(tiny_hf_model(seed, **model_overrides), copy.deepcopy(peft_config))
    peft_model.save_pretrained(out_dir)
    return peft_model


def edit_adapter_config(adapter_dir: Path, **changes) -> Path:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return adapter_dir
