"""Incremental detokenization with the real SmolLM2 tokenizer (byte-level BPE splits characters)."""

import random

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from prefixserve.engine.detokenizer import IncrementalDetokenizer, WindowDetokenizer

TEXTS = ["Hello, world! How are you today?", "naïve café — 東京タワー 🚀🎉 ok", "  leading spaces\nand\ttabs",
         "emoji at the end 👍🏽"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_a_fast_tokenizer_streams_through_decode_stream(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Say:").input_ids)
    assert isinstance(detok._stream, DecodeStream) and detok._window is None


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("streaming", [True, False], ids=["decode_stream", "window"])
def test_deltas_never_break_characters_and_add_up(tokenizer, text, streaming):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt) if streaming else WindowDetokenizer(tokenizer, prompt[-5:])
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert any(d == "" for d in deltas) or text.isascii()  # multi-token characters wait for completion


def test_decode_stream_matches_the_window_on_arbitrary_token_sequences(tokenizer):
    """Sampled output is not always valid text: random ids (byte fragments that never complete,
    special tokens in the middle) must give the same deltas on both paths."""
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    for _ in range(40):
        prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 9))]
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(tokenizer.vocab_size)
               for _ in range(60)]
        stream, window = IncrementalDetokenizer(tokenizer, prompt), WindowDetokenizer(tokenizer, prompt[-5:])
        window_deltas = [window.add(t) for t in ids]
        assert [stream.add(t) for t in ids] == window_deltas
        assert stream.text == "".join(window_deltas)


def test_special_tokens_are_skipped(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    ids = tokenizer("Hi", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert [detok.add(t) for t in ids][-1] == "" and detok.text == "Hi"
