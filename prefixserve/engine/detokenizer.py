"""Incremental detokenization that never emits half a multi-byte character.

A fast (Rust-backed) tokenizer streams through `tokenizers.decoders.DecodeStream`: one call into
Rust per token, instead of two windowed `decode`s through transformers' Python layer, which was
per-token work on the engine thread. Tokenizers without a Rust backend keep the windowed decode.

Both seed the stream with a few prompt tokens, so tokenizers that drop a leading space on the
first decoded token (SentencePiece) still produce the right first word, and both hold text back
while its tail decodes to U+FFFD (an incomplete UTF-8 sequence)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """`add(token_id)` returns the newly completed text; `text` is everything emitted so far
    (the engine truncates it where a stop string matched)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend: Tokenizer | None = backend if isinstance(backend, Tokenizer) else None
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._stream = DecodeStream(ids=context, skip_special_tokens=True) if self._backend is not None else None
        self._window = None if self._backend is not None else WindowDetokenizer(tokenizer, context)
        self.text = ""

    def add(self, token_id: int) -> str:
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
        else:
            delta = self._window.add(token_id)
        self.text += delta
        return delta


class WindowDetokenizer:
    """Decodes a short window (`prefix_offset:`) and emits only what lies beyond the text the
    window already produced; the same algorithm DecodeStream runs in Rust."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text):]
