"""OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`), as vLLM and
LoRAX expose them: the `model` field names the task, so an OpenAI client or benchmark tool can
address any task without knowing our native API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.request import RequestOutput, SamplingParams
from prefixserve.engine.task_pointers import BASE_TASK
from prefixserve.errors import PrefixServeError
from prefixserve.server import auth
from prefixserve.server.auth import Caller
from prefixserve.server.chat import chat_prompt_ids
from prefixserve.server.disconnect import with_cancellation
from prefixserve.server.openai_choices import (
    Choice,
    PromptChoices,
    chat_logprobs,
    collect_all,
    completion_logprobs,
    merge,
    usage,
)
from prefixserve.server.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from prefixserve.server.protocol import ChatMessage, error_responses, event_stream_response
from prefixserve.server.sampling import sampling_params

# Builds one stream chunk from one engine output of prompt i, or None when there is nothing to send yet.
ChunkBuilder = Callable[[int, RequestOutput], BaseModel | None]


# serve(caller, model, prompt, params, prompt_ids, request_id) -> the request's outputs
ServeFn = Callable[[Caller, str, str | None, SamplingParams, list[int] | None, str], AsyncIterator[RequestOutput]]


def openai_router(engine: AsyncEngine, serve: ServeFn, list_tasks: Callable[[Caller], list[str]]) -> APIRouter:
    """`serve` runs a request for the caller with `model` as its task (the app maps it to the
    tenant's namespace, meters and tracks it); `list_tasks(caller)` names the tasks `/v1/models`
    lists besides "base" (it may read the store: it runs off the event loop)."""
    sync = engine.engine
    backbone = sync.backbone
    tokenizer = backbone.tokenizer
    started = int(time.time())
    router = APIRouter(tags=["openai"])
    generation_errors = error_responses(400, 401, 403, 404, 429, 503, 504)

    @router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 503))
    async def models(caller: Caller = Depends(auth.caller)) -> ModelList:
        tasks = await asyncio.to_thread(list_tasks, caller)
        names = dict.fromkeys([BASE_TASK, backbone.name, *tasks])  # ordered, without repeats
        return ModelList(data=[ModelCard(id=name, created=started) for name in names])

    @router.post("/v1/completions", response_model=CompletionResponse,
                 responses={**event_stream_response(CompletionResponse), **generation_errors})
    @with_cancellation
    async def completions(body: CompletionRequest, raw_request: Request, caller: Caller = Depends(auth.caller)):
        model, request_id, created = body.model or BASE_TASK, f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = body.n or 1
        best_of = body.best_of or n
        k = body.logprobs  # None: no logprobs; k: the chosen tokens' and k alternatives
        # max_tokens null: until the context ends (the engine knows the task's virtual tokens); a number
        # the context cannot hold is a 400 from the engine, as in vLLM, never silently clamped.
        params = sampling_params(body, body.max_tokens, logprobs=k is not None or best_of > n, top_logprobs=k or 0,
                                 prompt_logprobs=k if body.echo and k is not None else None, n=best_of)
        prompts = body.prompts
        streams = [serve(caller, model, p if isinstance(p, str) else None, params,
                         None if isinstance(p, str) else p, request_id if len(prompts) == 1 else f"{request_id}-{i}")
                   for i, p in enumerate(prompts)]
        states = [PromptChoices(n, i * n) for i in range(len(prompts))]
        echoed = [p if isinstance(p, str) else None for p in prompts]  # token-id prompts: decoded when known

        def echo_text(i: int) -> str:
            if echoed[i] is None:
                echoed[i] = tokenizer.decode(states[i].prompt_token_ids or prompts[i]) if tokenizer else ""
            return echoed[i]

        def logprobs_of(i: int, token_ids: list[int], logprobs: list[float], top: list, first: bool,
                        offset: int) -> object:
            if k is None:
                return None
            state = states[i]
            if first and body.echo and state.prompt_logprobs is not None:
                token_ids = state.prompt_token_ids + token_ids
                logprobs = state.prompt_logprobs + logprobs
                top = (state.prompt_top_logprobs or [None] * len(state.prompt_logprobs)) + list(top)
            return completion_logprobs(tokenizer, token_ids, logprobs, top if k else None, offset)

        if not body.stream:
            await collect_all(streams, states)
            choices = []
            for i, state in enumerate(states):
                ranked = sorted(state.choices.values(), key=lambda c: -c.mean_logprob)[:n] if best_of > n else \
                    [state.choices[j] for j in sorted(state.choices)]
                for j, c in enumerate(ranked):
                    text = "".join(c.text)
                    choices.append(CompletionChoice(
                        index=i * n + j, text=(echo_text(i) if body.echo else "") + text,
                        logprobs=logprobs_of(i, c.token_ids, c.logprobs, c.top_logprobs, True, 0),
                        finish_reason=c.finish_reason))
            return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=usage(states))

        offsets: dict[tuple[int, int], int] = {}  # (prompt, choice) -> characters streamed, for text_offset

        def chunk(i: int, out: RequestOutput) -> CompletionResponse | None:
            choice = states[i].add(out)
            first = (i, out.index) not in offsets
            if not (first or out.new_text or out.choice_finished or (k is not None and out.new_token_ids)):
                return None  # text held back (a possible stop string): nothing to say yet
            text = (echo_text(i) if first and body.echo else "") + out.new_text
            offset = offsets.get((i, out.index), 0)
            logprobs = logprobs_of(i, out.new_token_ids, out.new_logprobs or [], out.new_top_logprobs or [],
                                   first, offset)
            offsets[(i, out.index)] = offset + (sum(map(len, logprobs.tokens)) if logprobs is not None else len(text))
            piece = CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                     finish_reason=out.finish_reason if out.choice_finished else None)
            return CompletionResponse(id=request_id, created=created, model=model, choices=[piece],
                                      usage=usage(states) if body.continuous_usage else None)

        def usage_chunk() -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage(states))

        return await _stream(merge(streams), chunk, usage_chunk if body.include_usage else None)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                 responses={**event_stream_response(ChatCompletionChunk), **generation_errors})
    @with_cancellation
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request,
                               caller: Caller = Depends(auth.caller)):
        model, request_id, created = body.model or BASE_TASK, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                    for m in body.messages]
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)  # a long chat: off the loop
        n = body.n or 1
        params = sampling_params(body, body.max_new_tokens, logprobs=bool(body.logprobs),
                                 top_logprobs=body.top_logprobs or 0, n=n)
        streams = [serve(caller, model, None, params, prompt_ids, request_id)]
        state = PromptChoices(n, 0)

        def logprobs_of(token_ids: list[int], logprobs: list[float], top: list):
            return chat_logprobs(tokenizer, token_ids, logprobs, top) if params.logprobs else None

        if not body.stream:
            await collect_all(streams, [state])
            choices = [ChatChoice(index=c.index, message=ChatMessageOut(content="".join(c.text)),
                                  logprobs=logprobs_of(c.token_ids, c.logprobs, c.top_logprobs),
                                  finish_reason=c.finish_reason)
                       for c in (state.choices[j] for j in sorted(state.choices))]
            return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                          usage=usage([state]))

        started_choices: set[int] = set()

        def chunk(_: int, out: RequestOutput) -> ChatCompletionChunk | None:
            choice: Choice = state.add(out)
            first = out.index not in started_choices
            if not (first or out.new_text or out.choice_finished or (params.logprobs and out.new_token_ids)):
                return None
            started_choices.add(out.index)
            delta = ChatDelta(role="assistant" if first else None, content=out.new_text)
            piece = ChatChunkChoice(index=choice.index, delta=delta,
                                    logprobs=logprobs_of(out.new_token_ids, out.new_logprobs or [],
                                                         out.new_top_logprobs or []),
                                    finish_reason=out.finish_reason if out.choice_finished else None)
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[piece],
                                       usage=usage([state]) if body.continuous_usage else None)

        def usage_chunk() -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                       usage=usage([state]))

        return await _stream(merge(streams), chunk, usage_chunk if body.include_usage else None)

    return router


async def _stream(outputs: AsyncIterator[tuple[int, RequestOutput]], chunk: ChunkBuilder,
                  usage_chunk: Callable[[], BaseModel] | None) -> StreamingResponse:
    first = await anext(outputs)  # admission errors (unknown task, full queue) become a status code here
    return StreamingResponse(_sse(first, outputs, chunk, usage_chunk), media_type="text/event-stream")


async def _sse(first: tuple[int, RequestOutput], rest: AsyncIterator[tuple[int, RequestOutput]],
               chunk: ChunkBuilder, usage_chunk: Callable[[], BaseModel] | None) -> AsyncIterator[str]:
    """`data: {chunk}` events, the usage chunk if asked for, then `data: [DONE]`. Closing this
    generator (the client left) closes `rest`, which aborts the requests in the engine."""
    try:
        item = first
        while item is not None:
            piece = chunk(*item)
            if piece is not None:
                yield f"data: {piece.model_dump_json()}\n\n"
            item = await anext(rest, None)
        if usage_chunk is not None:
            yield f"data: {usage_chunk().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except PrefixServeError as exc:  # after the 200 went out, an error can only be an event (the client raises it)
        yield "data: " + json.dumps({"error": {"type": exc.code, "message": exc.message}}) + "\n\n"
    finally:
        await rest.aclose()
