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

from prefixserve.engine.adapters import BASE_TASK
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.request import RequestOutput, SamplingParams
from prefixserve.errors import PrefixServeError
from prefixserve.server import auth
from prefixserve.server.auth import Caller
from prefixserve.server.chat import chat_prompt_ids
from prefixserve.server.disconnect import with_cancellation
from prefixserve.server.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from prefixserve.server.protocol import ChatMessage, error_responses, event_stream_response

# Builds one stream chunk from one engine output, or None when there is nothing to send yet.
ChunkBuilder = Callable[[RequestOutput], BaseModel | None]


# serve(caller, model, prompt, params, prompt_ids, request_id) -> the request's outputs
ServeFn = Callable[[Caller, str, str | None, SamplingParams, list[int] | None, str], AsyncIterator[RequestOutput]]


def openai_router(engine: AsyncEngine, serve: ServeFn, list_tasks: Callable[[Caller], list[str]]) -> APIRouter:
    """`serve` runs a request for the caller with `model` as its task (the app maps it to the
    tenant's namespace, meters and tracks it); `list_tasks(caller)` names the tasks `/v1/models`
    lists besides "base" (it may read the store: it runs off the event loop)."""
    sync = engine.engine
    backbone = sync.backbone
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
        prompt, prompt_ids = (body.prompt, None) if isinstance(body.prompt, str) else (None, body.prompt)
        # max_tokens null: until the context ends (the engine knows the task's virtual tokens); a number
        # the context cannot hold is a 400 from the engine, as in vLLM, never silently clamped.
        params = _sampling_params(body, body.max_tokens, logprobs=body.logprobs is not None)
        outputs = serve(caller, model, prompt, params, prompt_ids, request_id)

        def completion(out: RequestOutput, text: str, offset: int) -> CompletionResponse:
            logprobs = _completion_logprobs(backbone.tokenizer, out, offset) if params.logprobs else None
            choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=out.finish_reason)
            return CompletionResponse(id=request_id, created=created, model=model, choices=[choice])

        if not body.stream:
            last = await _collect(outputs)
            return completion(last, last.new_text, 0).model_copy(update={"usage": _usage(last)})

        text_offset = 0

        def chunk(out: RequestOutput) -> CompletionResponse | None:
            nonlocal text_offset
            if not (out.new_text or out.finished or (params.logprobs and out.new_token_ids)):
                return None  # text held back (a possible stop string): nothing to say yet
            piece = completion(out, out.new_text, text_offset)
            text_offset += sum(len(t) for t in piece.choices[0].logprobs.tokens) if params.logprobs else 0
            return piece

        def usage_chunk(last: RequestOutput) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=_usage(last))

        return await _stream(outputs, chunk, usage_chunk if body.include_usage else None)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                 responses={**event_stream_response(ChatCompletionChunk), **generation_errors})
    @with_cancellation
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request,
                               caller: Caller = Depends(auth.caller)):
        model, request_id, created = body.model or BASE_TASK, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                    for m in body.messages]
        prompt_ids = chat_prompt_ids(backbone.tokenizer, messages)
        params = _sampling_params(body, body.max_new_tokens, logprobs=bool(body.logprobs))
        outputs = serve(caller, model, None, params, prompt_ids, request_id)

        def logprobs_of(out: RequestOutput) -> ChatLogprobs | None:
            return _chat_logprobs(backbone.tokenizer, out) if params.logprobs else None

        if not body.stream:
            last = await _collect(outputs)
            choice = ChatChoice(message=ChatMessageOut(content=last.new_text), logprobs=logprobs_of(last),
                                finish_reason=last.finish_reason)
            return ChatCompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                          usage=_usage(last))

        is_first = True

        def chunk(out: RequestOutput) -> ChatCompletionChunk | None:
            nonlocal is_first
            if not (is_first or out.new_text or out.finished or (params.logprobs and out.new_token_ids)):
                return None
            delta = ChatDelta(role="assistant" if is_first else None, content=out.new_text)
            is_first = False
            choice = ChatChunkChoice(delta=delta, logprobs=logprobs_of(out), finish_reason=out.finish_reason)
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])

        def usage_chunk(last: RequestOutput) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=_usage(last))

        return await _stream(outputs, chunk, usage_chunk if body.include_usage else None)

    return router


def _sampling_params(body: SamplingFields, max_new_tokens: int | None, logprobs: bool) -> SamplingParams:
    """OpenAI's defaults for what the client left out or sent as null; SamplingParams checks the ranges."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0, seed=body.seed, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos), min_tokens=body.min_tokens or 0, logprobs=logprobs,
    )


async def _collect(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Fold every delta into one output that holds the whole text, tokens and logprobs."""
    text, token_ids, logprobs, last = [], [], [], None
    async for out in outputs:
        text.append(out.new_text)
        token_ids += out.new_token_ids
        logprobs += out.new_logprobs or []
        last = out
    last.new_text, last.new_token_ids, last.new_logprobs = "".join(text), token_ids, logprobs
    return last


async def _stream(outputs: AsyncIterator[RequestOutput], chunk: ChunkBuilder,
                  usage_chunk: ChunkBuilder | None) -> StreamingResponse:
    first = await anext(outputs)  # admission errors (unknown task, full queue) become a status code here
    return StreamingResponse(_sse(first, outputs, chunk, usage_chunk), media_type="text/event-stream")


async def _sse(first: RequestOutput, rest: AsyncIterator[RequestOutput], chunk: ChunkBuilder,
               usage_chunk: ChunkBuilder | None) -> AsyncIterator[str]:
    """`data: {chunk}` events, the usage chunk if asked for, then `data: [DONE]`. Closing this
    generator (the client left) closes `rest`, which aborts the request in the engine."""
    try:
        out = first
        while True:
            piece = chunk(out)
            if piece is not None:
                yield f"data: {piece.model_dump_json()}\n\n"
            if out.finished:
                break
            out = await anext(rest)
        if usage_chunk is not None:
            yield f"data: {usage_chunk(out).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except PrefixServeError as exc:  # after the 200 went out, an error can only be an event (the client raises it)
        yield "data: " + json.dumps({"error": {"type": exc.code, "message": exc.message}}) + "\n\n"
    finally:
        await rest.aclose()


def _usage(last: RequestOutput) -> Usage:
    return Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=last.num_output_tokens,
                 total_tokens=last.num_prompt_tokens + last.num_output_tokens)


def _token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    # Each token decoded alone, as OpenAI shows them (a byte-level piece may decode to U+FFFD).
    return [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in token_ids]


def _completion_logprobs(tokenizer, out: RequestOutput, offset: int) -> CompletionLogprobs:
    tokens, logprobs = _token_texts(tokenizer, out.new_token_ids), out.new_logprobs or []
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets,
                              top_logprobs=[{t: lp} for t, lp in zip(tokens, logprobs)])


def _chat_logprobs(tokenizer, out: RequestOutput) -> ChatLogprobs:
    tokens = _token_texts(tokenizer, out.new_token_ids)
    return ChatLogprobs(content=[ChatTokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                 for t, lp in zip(tokens, out.new_logprobs or [])])
