"""FastAPI app factory. The engine is built by the caller (cli.py) and handed in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.request import RequestOutput, SamplingParams
from prefixserve.engine.task_pointers import BASE_TASK
from prefixserve.engine.tenancy import tenant_task, tenant_tasks
from prefixserve.errors import PrefixServeError
from prefixserve.server.admin_routes import admin_router
from prefixserve.server.auth import Authenticator, Caller, metrics_reader
from prefixserve.server.auth import caller as auth_caller
from prefixserve.server.body_rate import DEFAULT_GRACE_S, DEFAULT_MIN_BYTES_PER_S, MinimumBodyRate
from prefixserve.server.chat import chat_prompt_ids
from prefixserve.server.deadline import with_deadline
from prefixserve.server.disconnect import with_cancellation
from prefixserve.server.errors import error_response, install_error_handlers
from prefixserve.server.metrics import ServerMetrics
from prefixserve.server.openai_routes import openai_router
from prefixserve.server.protocol import (
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    error_responses,
    event_stream_response,
)
from prefixserve.server.quotas import QuotaManager
from prefixserve.server.sampling import sampling_params
from prefixserve.server.tasks_routes import UploadSlots, tasks_router
from prefixserve.server.training_routes import training_router
from prefixserve.training.queue import JobQueue


def create_app(engine: AsyncEngine, request_timeout_s: float = 600.0, auth: Authenticator | None = None,
               job_queue: JobQueue | None = None, quotas: QuotaManager | None = None,
               min_body_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S, body_grace_s: float = DEFAULT_GRACE_S
               ) -> FastAPI:
    """`request_timeout_s` bounds every generation request (a 504 after it; the request is aborted).
    `auth` None: no API keys, every caller is tenant "default" (the CLI then binds loopback only).
    `job_queue` None: the training endpoints answer 501. `quotas` None: tenants' rate limits are
    metered in this process only (the CLI passes a Redis-backed one when replicas share a Redis).
    A request body must arrive at `min_body_bytes_per_s` on average after `body_grace_s` (a 408 otherwise)."""
    app = FastAPI(title="prefixserve", version="0.1.0")
    app.add_middleware(MinimumBodyRate, min_bytes_per_s=min_body_bytes_per_s, grace_s=body_grace_s)
    app.state.engine = engine
    app.state.auth = auth = auth or Authenticator()
    install_error_handlers(app)
    store = engine.engine.store
    backbone = engine.engine.backbone
    metrics = ServerMetrics(engine.engine)
    quotas = quotas if quotas is not None else QuotaManager()

    def serve(caller: Caller, task: str | None, prompt: str | None, params: SamplingParams,
              prompt_ids: list[int] | None, request_id: str) -> AsyncIterator[RequestOutput]:
        """Every route's generation: the caller's task, admitted by its limits, bounded in time, counted."""
        engine_task = tenant_task(caller.tenant, task, backbone.name)
        outputs = engine.generate(prompt, params, prompt_ids, request_id, tenant=caller.tenant, task=engine_task,
                                  tenant_weight=caller.weight)
        return metrics.track(with_deadline(quotas.guard(caller, outputs), request_timeout_s), caller.tenant,
                             engine_task)

    app.include_router(openai_router(
        engine, serve, list_tasks=lambda caller: tenant_tasks(caller.tenant, store.list_tasks(f"{caller.tenant}/"))))
    app.state.uploads = UploadSlots()
    app.include_router(tasks_router(engine, app.state.uploads))
    app.include_router(admin_router(auth))
    app.include_router(training_router(job_queue, backbone.name, store))

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401, 403),
             dependencies=[Depends(metrics_reader)])
    async def prometheus_metrics() -> Response:
        """Prometheus text. With API keys on, only the admin key or the metrics key reads it (it
        names every tenant's tasks); open when the server runs without keys (loopback only)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", responses=error_responses(503))
    async def health():
        """Liveness: 503 once the engine loop has died, so an orchestrator restarts the process. A
        failing task version or request never gets here (it is contained); a store outage is /ready's."""
        if not engine.is_alive:
            reason = engine.error.message if engine.error is not None else "the engine loop is not running"
            return error_response(503, "engine_dead", reason)
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(503))
    async def ready() -> JSONResponse:
        if not engine.is_alive:
            return error_response(503, "not_ready", "the engine loop is not running")
        try:  # one cheap read proves the store answers (a Redis outage makes the replica not ready)
            await asyncio.to_thread(engine.engine.store.current, "__readiness_probe__")
        except PrefixServeError as exc:
            return error_response(503, "not_ready", f"the adapter store is unreachable: {exc.message}")
        return JSONResponse({"status": "ready", "backbone": backbone.name})

    @app.post("/v1/generate", response_model=GenerateResponse, responses={
        **event_stream_response(GenerateChunk), **error_responses(400, 401, 403, 404, 429, 503, 504)})
    @with_cancellation
    async def generate(body: GenerateRequest, raw_request: Request, caller: Caller = Depends(auth_caller)):
        task = body.task or BASE_TASK
        params = sampling_params(body, body.max_new_tokens, logprobs=body.logprobs or body.top_logprobs > 0,
                                 top_logprobs=body.top_logprobs)
        prompt, prompt_ids = body.prompt, None
        if body.messages is not None:
            prompt, prompt_ids = None, await asyncio.to_thread(chat_prompt_ids, backbone.tokenizer, body.messages)
        request_id = uuid.uuid4().hex
        outputs = serve(caller, task, prompt, params, prompt_ids, request_id)
        if body.stream:
            first = await anext(outputs)  # surface admission errors as a status code, not mid-stream
            return StreamingResponse(_sse(first, outputs), media_type="text/event-stream")
        text, token_ids, logprobs, top, last = [], [], [], [], None
        async for out in outputs:
            text.append(out.new_text)
            token_ids += out.new_token_ids
            logprobs += out.new_logprobs or []
            top += out.new_top_logprobs or []
            last = out
        return GenerateResponse(
            id=request_id, task=task, text="".join(text), token_ids=token_ids, finish_reason=last.finish_reason,
            usage={"prompt_tokens": last.num_prompt_tokens, "completion_tokens": last.num_output_tokens},
            logprobs=logprobs if params.logprobs else None,
            top_logprobs=[{str(t): lp for t, lp in position} for position in top] if body.top_logprobs else None,
        )

    return app


async def _sse(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Server-Sent Events: one JSON delta per event, then [DONE]. Closing this generator (client
    gone) closes `rest`, which aborts the request in the engine."""
    try:
        out = first
        while True:
            yield "data: " + json.dumps({"text": out.new_text, "token_ids": out.new_token_ids,
                                         "finish_reason": out.finish_reason}) + "\n\n"
            if out.finished:
                break
            out = await anext(rest)
        yield "data: [DONE]\n\n"
    except PrefixServeError as exc:
        yield "data: " + json.dumps({"error": {"type": exc.code, "message": exc.message}}) + "\n\n"
    finally:
        await rest.aclose()
