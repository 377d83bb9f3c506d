"""The engine as the server sees it: `generate()` is an async iterator of outputs, `abort()` stops
a request. The step loop runs on its own thread, so the event loop never waits on the model; the
two sides talk through a locked inbox (adds, aborts) and per-request asyncio queues (outputs)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from prefixserve.engine.background import BackgroundWorkers
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import Request, RequestOutput, SamplingParams
from prefixserve.errors import EngineDeadError, EngineOverloadedError, PrefixServeError

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: list[tuple[str, Any]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_pending = 0  # accepted but not yet finished: bounds the queue across both sides
        self._error: PrefixServeError | None = None
        self._stopped = False
        self.background = BackgroundWorkers()  # uploads' CPU and store work, at a lower OS priority
        self._thread = threading.Thread(target=self._run, name="prefixserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """False once the step loop has stopped (crashed or shut down): nothing can be served."""
        return self._thread.is_alive() and self._error is None

    @property
    def error(self) -> PrefixServeError | None:
        """Why the loop stopped, if it did."""
        return self._error

    async def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams = SamplingParams(),
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        tenant: str = "default",
        task: str | None = None,
        tenant_weight: float = 1.0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes. Leaving the loop early (a client disconnect)
        aborts the request, which frees its KV pages and its hold on the task's adapter."""
        # Off the event loop: tokenizing a long prompt, or a store lookup for a task not seen yet
        # (a network round trip with Redis), must not stall every other connection.
        request = await asyncio.to_thread(self.engine.make_request, prompt, params, prompt_token_ids, request_id,
                                          tenant, task, tenant_weight)
        queue: asyncio.Queue = asyncio.Queue()
        self._submit(request, queue)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, PrefixServeError):
                    raise item
                if item.error is not None:  # e.g. its adapter failed to load
                    finished = True
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    async def register_adapter(self, task: str, data: bytes):
        """Register an upload without stalling the step loop: decoding and validating (CPU), and the
        store write (fsyncs, or a round trip to Redis) run on low-priority background threads; the
        engine thread only compiles the version between two steps (a prefill of its virtual tokens,
        or a LoRA slot copy), before it is stored, and frees the version it replaced."""
        adapters = self.engine.adapters
        upload = await self.background.run(adapters.prepare_upload, task, data)
        await self.call(lambda engine: engine.adapters.compile_upload(upload))
        artifact = await self.background.run(adapters.publish_upload, task, upload)
        await self.call(lambda engine: engine.adapters.free_stale())
        return artifact

    async def unregister_adapter(self, task: str) -> None:
        await asyncio.to_thread(self.engine.adapters.unregister, task)  # a store write: off the engine thread
        await self.call(lambda engine: engine.adapters.free_stale())

    async def rollback_adapter(self, task: str, version: str | None = None) -> str:
        target = await asyncio.to_thread(self.engine.adapters.rollback, task, version)
        await self.call(lambda engine: engine.adapters.free_stale())
        return target

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) between two steps on the engine thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._error is not None:
                raise self._error
            self._inbox.append(("call", (fn, future)))
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)
        self.background.shutdown()

    def _submit(self, request: Request, queue: asyncio.Queue) -> None:
        limit = self.engine.config.scheduler.max_in_flight
        with self._lock:
            if self._error is not None:
                raise self._error
            if request.request_id in self._streams:
                raise PrefixServeError(f"request id {request.request_id!r} is already in use")
            # Counted here, on the caller's side, so the answer never depends on the engine thread's timing.
            if self._num_pending >= limit:
                raise EngineOverloadedError(f"the engine queue is full ({limit} requests in flight)")
            self._num_pending += 1
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request))
        self._wakeup.set()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output)
        except Exception as exc:
            # Failures of one request or one task version are contained inside step(); what reaches
            # here broke the engine itself. Fail every request, and /health turns 503 for a restart.
            log.exception("engine step failed")
            self._fail_all(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))
        if self._stopped:
            self._fail_all(EngineDeadError("the engine is shutting down"))

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                try:
                    self.engine.add(item)
                except PrefixServeError as exc:
                    self._deliver_error(item.request_id, exc)
                except Exception as exc:  # one request's admission must not stop the loop
                    log.exception("admitting request %s failed", item.request_id)
                    self._deliver_error(item.request_id, PrefixServeError(
                        f"the request could not be admitted ({type(exc).__name__}: {exc})"))
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # handed to the awaiting caller, the loop goes on
                    future.set_exception(exc)
            else:
                output = self.engine.abort(item)
                if output is not None:
                    self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            target = self._streams.get(output.request_id)
            if output.finished and target is not None:
                del self._streams[output.request_id]
                self._num_pending -= 1
        if target is not None:
            _put(target, output)

    def _deliver_error(self, request_id: str, error: PrefixServeError) -> None:
        with self._lock:
            target = self._streams.pop(request_id, None)
            if target is not None:
                self._num_pending -= 1
        if target is not None:
            _put(target, error)

    def _fail_all(self, error: PrefixServeError) -> None:
        with self._lock:
            self._error = error
            request_ids = list(self._streams)
            calls = [item for kind, item in self._inbox if kind == "call"]
            self._inbox = []
        for _, future in calls:
            future.set_exception(error)
        for request_id in request_ids:
            self._deliver_error(request_id, error)


def _put(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    loop, queue = target
    with contextlib.suppress(RuntimeError):  # the caller's event loop is gone; nobody listens any more
        loop.call_soon_threadsafe(queue.put_nowait, item)
