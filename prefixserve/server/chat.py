"""Chat messages to prompt tokens through the backbone's own chat template."""

from __future__ import annotations

from prefixserve.engine.request import check_unicode_text
from prefixserve.errors import InvalidRequestError
from prefixserve.server.protocol import ChatMessage


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Chat messages -> token ids, the generation prompt appended."""
    if tokenizer is None or not tokenizer.chat_template:
        raise InvalidRequestError("this backbone has no chat template; send a plain prompt instead of messages")
    if not messages:
        raise InvalidRequestError("expected at least one chat message, found an empty list")
    for i, message in enumerate(messages):
        check_unicode_text(message.content, f"messages[{i}].content")
    text = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                         add_generation_prompt=True)
    # The template already wrote the special tokens; tokenizing must not add a second BOS.
    return tokenizer(text, add_special_tokens=False).input_ids
