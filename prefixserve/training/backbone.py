"""The frozen backbone a training job trains against: the transformers model of the same directory the
server loads, with the shape facts and fingerprint the server will check the trained artifact against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from prefixserve.adapters_store.fingerprint import fingerprint_from_parts
from prefixserve.config import EMBEDDED_BACKBONE, AdapterLimits, ModelConfig
from prefixserve.errors import ModelLoadError
from prefixserve.models.llama import LlamaArch
from prefixserve.models.loader import SUPPORTED_ARCHITECTURES


@dataclass
class TrainingBackbone:
    """Shared by every job of a worker. Jobs wrap `model` but must leave it exactly as they found it."""

    model: torch.nn.Module  # transformers causal LM: fp32, eval mode, requires_grad False
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path
    arch: LlamaArch
    fingerprint: dict
    limits: AdapterLimits
    eos_token_ids: frozenset[int]  # the tokens the engine stops on

    @property
    def max_model_len(self) -> int:
        return self.arch.max_position_embeddings


def resolve_model_dir(model: ModelConfig) -> Path:
    """The Hugging Face directory the server would load for this config."""
    if model.source == EMBEDDED_BACKBONE:
        from prefixserve.models.embedded import prepare_embedded_backbone

        return prepare_embedded_backbone(Path(model.cache_dir).expanduser())
    return Path(model.source)


def load_training_backbone(model: ModelConfig, limits: AdapterLimits = AdapterLimits()) -> TrainingBackbone:
    """Load the backbone for training in fp32 on model.device, whatever dtype the server serves in:
    gradients in half precision are not worth the trouble at these sizes. The fingerprint hashes the
    fp32 embedding, which matches a server that serves in fp32 (the default)."""
    path = resolve_model_dir(model)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"expected a Hugging Face model directory with config.json at {str(path)!r}, found none")
    hf_config = AutoConfig.from_pretrained(path)
    architectures = getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}, found {architectures[0]}")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    hf_model = hf_model.to(model.device).eval().requires_grad_(False)
    # The server decides qkv_bias from the checkpoint's tensors; a loaded q_proj has a bias exactly then.
    qkv_bias = hf_model.model.layers[0].self_attn.q_proj.bias is not None
    arch = LlamaArch.from_hf_config(hf_config, qkv_bias=qkv_bias)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fingerprint = fingerprint_from_parts(arch, hf_model.get_input_embeddings().weight)
    return TrainingBackbone(model=hf_model, tokenizer=tokenizer, model_dir=path, arch=arch, fingerprint=fingerprint,
                            limits=limits, eos_token_ids=_eos_token_ids(path, hf_config, tokenizer))


def _eos_token_ids(path: Path, hf_config, tokenizer) -> frozenset[int]:
    """The same set the server's loader builds: config, tokenizer and generation_config EOS ids."""
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if (path / "generation_config.json").is_file():
        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)
