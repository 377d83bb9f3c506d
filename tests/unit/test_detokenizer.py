"""Incremental detokenization with the real SmolLM2 tokenizer (byte-level BPE splits characters)."""

import pytest
from transformers import AutoTokenizer

from prefixserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello, world! How are you today?", "naïve café — 東京タワー 🚀🎉 ok", "  leading spaces\nand\ttabs",
         "emoji at the end 👍🏽"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_break_characters_and_add_up(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert any(d == "" for d in deltas) or text.isascii()  # multi-token characters wait for completion
