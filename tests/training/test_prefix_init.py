"""Prefix init from real text: the initialised prefix is exactly that text written in front."""

import pytest
import torch
from peft import get_peft_model

from prefixserve.training.prefix_init import fit_prefix_encoder, real_token_prefix, text_token_ids
from prefixserve.training.spec import Hyperparameters
from prefixserve.training.trainers import _prefix_init_target, peft_config, wrapped

TEXT = "Answer yes or no."


@pytest.fixture(scope="module")
def backbone(tiny_training_backbone):
    return tiny_training_backbone


def test_text_ids_are_cut_or_repeated_to_the_prefix_length(backbone):
    tok = backbone.tokenizer
    whole = tok(TEXT + "\n", add_special_tokens=False)["input_ids"]
    assert text_token_ids(tok, TEXT, 3) == whole[:3]
    assert text_token_ids(tok, TEXT, len(whole) * 2 + 1) == whole * 2 + whole[:1]


def test_fit_makes_the_encoder_output_the_target_exactly(backbone):
    hp = Hyperparameters(num_virtual_tokens=6, encoder_hidden=16)
    torch.manual_seed(0)
    with wrapped(backbone.model, lambda m: get_peft_model(m, peft_config(backbone, "prefix", hp, None))) as model:
        encoder = model.prompt_encoder["default"]
        target = torch.randn(6, encoder.transform[2].out_features) * 5
        assert fit_prefix_encoder(encoder, target) < 1e-4
        torch.testing.assert_close(encoder(torch.arange(6)), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_virtual_tokens", [3, 9])
def test_initialised_prefix_equals_the_text_in_front(backbone, num_virtual_tokens):
    """Logits through the peft prefix model == logits of the plain backbone on text ids + prompt ids."""
    hp = Hyperparameters(num_virtual_tokens=num_virtual_tokens, encoder_hidden=32)
    target = _prefix_init_target(backbone, "prefix", hp, TEXT)
    assert target.shape == (num_virtual_tokens, backbone.arch.num_layers * 2 * backbone.arch.num_kv_heads
                            * backbone.arch.head_dim)
    prompt = backbone.tokenizer("word apple\nAnswer:", add_special_tokens=False)["input_ids"]
    front = text_token_ids(backbone.tokenizer, TEXT, num_virtual_tokens)
    torch.manual_seed(0)
    with wrapped(backbone.model, lambda m: get_peft_model(m, peft_config(backbone, "prefix", hp, TEXT))) as model, \
            torch.no_grad():
        fit_prefix_encoder(model.prompt_encoder["default"], target)
        prefixed = model(input_ids=torch.tensor([prompt])).logits[0]
    with torch.no_grad():
        written = backbone.model(input_ids=torch.tensor([front + prompt])).logits[0, num_virtual_tokens:]
    torch.testing.assert_close(prefixed, written, atol=1e-4, rtol=1e-4)


def test_only_a_text_initialised_prefix_gets_a_target(backbone):
    assert _prefix_init_target(backbone, "prefix", Hyperparameters(init="random"), TEXT) is None
    assert _prefix_init_target(backbone, "prefix", Hyperparameters(), None) is None
    assert _prefix_init_target(backbone, "prompt", Hyperparameters(), TEXT) is None
    own = _prefix_init_target(backbone, "prefix", Hyperparameters(init_text="no"), TEXT)
    torch.testing.assert_close(own, real_token_prefix(backbone, "no", Hyperparameters().num_virtual_tokens))
