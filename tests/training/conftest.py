import shutil

import pytest
import torch

# The tokenizer files of SmolLM2 that make a directory loadable with AutoTokenizer (chat template included).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's real tokenizer, as a Hugging Face directory that both the
    training backbone and the server's loader load (2 layers, hidden 64, vocab 49152)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from prefixserve.models.tiny import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    # pad_token_id 0 (<|endoftext|>), not SmolLM2's 2: a random init zeroes the padding row of the tied
    # embedding, and row 2 is EOS, which could then never be predicted. std 0.2: logits far from ties.
    config = tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=0, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny-llama-real-tokenizer")
    LlamaForCausalLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_training_backbone(tiny_model_dir):
    from prefixserve.config import ModelConfig
    from prefixserve.training.backbone import load_training_backbone

    return load_training_backbone(ModelConfig(source=str(tiny_model_dir)))
