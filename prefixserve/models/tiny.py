"""A tiny random-weight Llama, built in-process, for fast tests (no files, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefixserve.config import ModelConfig
from prefixserve.models.loader import Backbone, build_backbone


def tiny_llama_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (GQA), head_dim 16, vocab 512."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, architectures=["LlamaForCausalLM"])
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The transformers reference model with random weights; std 0.2 so logits are far from ties."""
    torch.manual_seed(seed)
    config = tiny_llama_config(initializer_range=0.2, **overrides)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def tiny_backbone(hf_model: LlamaForCausalLM, tokenizer=None, **model_config) -> Backbone:
    return build_backbone(hf_model.config, hf_model.state_dict(), tokenizer, ModelConfig(**model_config),
                          name="tiny-llama")
