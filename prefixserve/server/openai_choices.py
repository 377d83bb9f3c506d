"""The choices of one OpenAI request as its outputs arrive: several prompts (a completions batch),
each with n choices; the text, tokens and logprobs of each, and the shapes OpenAI gives them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prefixserve.engine.request import RequestOutput, TopLogprobs
from prefixserve.server.openai_protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, Usage


@dataclass
class Choice:
    """One choice: everything its outputs carried so far (the API's index is prompt * n + index)."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        self.top_logprobs += out.new_top_logprobs or []
        if out.choice_finished:
            self.finish_reason = out.finish_reason

    @property
    def mean_logprob(self) -> float:
        """What best_of ranks by: the log-probability per token (OpenAI's "best")."""
        return sum(self.logprobs) / max(1, len(self.logprobs))


@dataclass
class PromptChoices:
    """One prompt's engine request: its n choices, its prompt (for echo) and its token counts."""

    n: int
    offset: int  # API index of this prompt's first choice
    choices: dict[int, Choice] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None

    def add(self, out: RequestOutput) -> Choice:
        """Fold one output in; returns its choice."""
        self.num_prompt_tokens = out.num_prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_token_ids, self.prompt_logprobs = out.prompt_token_ids, out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs
        choice = self.choices.setdefault(out.index, Choice(self.offset + out.index))
        choice.add(out)
        return choice

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())


def usage(prompts: list[PromptChoices]) -> Usage:
    """Prompt tokens once per prompt (its choices share them), completion tokens of every choice."""
    prompt_tokens = sum(p.num_prompt_tokens for p in prompts)
    completion_tokens = sum(p.num_output_tokens for p in prompts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def collect(outputs: AsyncIterator[RequestOutput], prompt: PromptChoices) -> PromptChoices:
    try:
        async for out in outputs:
            prompt.add(out)
    finally:
        await outputs.aclose()  # cancelled (another prompt failed): abort this one too
    return prompt


async def collect_all(streams: list[AsyncIterator[RequestOutput]], prompts: list[PromptChoices]) -> None:
    """Run every prompt's request to the end; the first error fails the whole request (the others
    are aborted) and is raised as itself, so it keeps its status code."""
    try:
        async with asyncio.TaskGroup() as group:
            for stream, prompt in zip(streams, prompts):
                group.create_task(collect(stream, prompt))
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come. Closing this closes every stream."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, done))
        except Exception as exc:  # handed to the consumer, which ends the whole request
            await queue.put((i, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- logprobs in OpenAI's shapes ------------------------------------------------------------------
def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    # Each token decoded alone, as OpenAI shows them (a byte-level piece may decode to U+FFFD).
    return [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in token_ids]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float | None],
                        top: list[TopLogprobs | None] | None, offset: int) -> CompletionLogprobs:
    """Legacy completions' shape. `top` per position (None: not asked for); the chosen token is
    always among a position's alternatives, as OpenAI and vLLM give them."""
    tokens = token_texts(tokenizer, token_ids)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops: list[dict[str, float] | None] = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
        if logprob is None:  # the first prompt token: nothing predicts it
            tops.append(None)
            continue
        alternatives = top[i] if top is not None and top[i] is not None else []
        entry = dict(zip(token_texts(tokenizer, [t for t, _ in alternatives]), (lp for _, lp in alternatives)))
        entry.setdefault(token, logprob)
        tops.append(entry)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], top: list[TopLogprobs]) -> ChatLogprobs:
    content = []
    for i, (token, logprob) in enumerate(zip(token_texts(tokenizer, token_ids), logprobs)):
        alternatives = top[i] if i < len(top) else []
        content.append(ChatTokenLogprob(
            token=token, logprob=logprob, bytes=list(token.encode()),
            top_logprobs=[ChatTopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                          for t, lp in zip(token_texts(tokenizer, [t for t, _ in alternatives]),
                                           (lp for _, lp in alternatives))]))
    return ChatLogprobs(content=content)
