"""Incremental detokenization that never emits half a multi-byte character.

Text is decoded over a short window (`prefix_offset:`) and only the part beyond what the window
already produced is emitted; while the tail decodes to U+FFFD (an incomplete UTF-8 sequence) we
wait for more tokens. A few prompt tokens seed the window so tokenizers that drop a leading space
on the first decoded token (SentencePiece) still produce the right first word."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text emitted so far

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
