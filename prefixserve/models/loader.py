"""Load a Llama-family backbone (config, tokenizer, weights) from a local Hugging Face directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from prefixserve.config import EMBEDDED_BACKBONE, ModelConfig
from prefixserve.errors import ModelLoadError
from prefixserve.models.llama import LlamaArch, LlamaModel, fuse_hf_state_dict, rope_tables

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class Backbone:
    """The resident frozen model and what the engine needs to know about it."""

    model: LlamaModel
    arch: LlamaArch
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    eos_token_ids: frozenset[int]
    max_model_len: int


def load_backbone(config: ModelConfig) -> Backbone:
    """Resolve `config.source` ("embedded" or a directory) and load it on config.device."""
    if config.source == EMBEDDED_BACKBONE:
        from prefixserve.models.embedded import prepare_embedded_backbone

        path = prepare_embedded_backbone(Path(config.cache_dir).expanduser())
    else:
        path = Path(config.source)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"expected a Hugging Face model directory with config.json at {str(path)!r}, found none")
    hf_config = AutoConfig.from_pretrained(path)
    state = _read_safetensors(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = build_backbone(hf_config, state, tokenizer, config, name=path.name)
    if (path / "generation_config.json").is_file():
        # Chat models often list their end-of-turn token only in generation_config.json.
        backbone.eos_token_ids |= _eos_token_ids(GenerationConfig.from_pretrained(path), None)
    return backbone


def build_backbone(
    hf_config: PretrainedConfig,
    hf_state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    config: ModelConfig,
    name: str,
) -> Backbone:
    """Build our model from a Hugging Face config and state dict (also used for in-process test models)."""
    architectures = getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}, found {architectures[0]}")
    arch = LlamaArch.from_hf_config(hf_config, qkv_bias="model.layers.0.self_attn.q_proj.bias" in hf_state)
    max_model_len = min(config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        # Within one window sliding-window attention equals full attention; we never go past it.
        max_model_len = min(max_model_len, window)
    dtype = getattr(torch, config.dtype)
    cos, sin = rope_tables(hf_config, max_model_len)
    with torch.device("meta"):
        model = LlamaModel(arch, cos, sin)
    weights = {k: v.to(dtype) for k, v in fuse_hf_state_dict(hf_state, arch).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and arch.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"backbone weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.rope_cos, model.rope_sin = cos, sin
    model = model.to(config.device).eval().requires_grad_(False)
    return Backbone(model=model, arch=arch, tokenizer=tokenizer, name=name,
                    eos_token_ids=_eos_token_ids(hf_config, tokenizer), max_model_len=max_model_len)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f"; found only pickled {pickled}, which are never unpickled" if pickled else ""
        raise ModelLoadError(f"expected *.safetensors weights in {str(path)!r}{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _eos_token_ids(hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)
