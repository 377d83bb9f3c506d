"""Prometheus metrics: per request (tokens, requests, queue time, TTFT, time per output token, by
tenant and task) observed as outputs stream by, and engine state (queues, KV pages, adapter cold
loads, host/device cache hits and evictions) read at scrape time. One registry per app.

Label values never come from raw client strings: `tenant` is the authenticated caller's (from the
tenant registry), and `task` is a task registered for that tenant, `base`, or UNKNOWN_TASK for any
other name a client sends (typos, random names), so series are bounded by the tasks that exist.
A deleted task's series are dropped at the next scrape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import RequestOutput
from prefixserve.engine.task_pointers import BASE_TASK
from prefixserve.errors import PrefixServeError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The one task label of names that are no registered task; '<' is never in a task name, so it cannot
# be mistaken for one.
UNKNOWN_TASK = "<unknown>"


class ServerMetrics:
    def __init__(self, engine: LLMEngine):
        self.registry = CollectorRegistry()
        labels = ["tenant", "task"]
        r = self.registry
        self.requests = Counter("prefixserve_requests", "Finished requests", [*labels, "finish_reason"], registry=r)
        self.errors = Counter("prefixserve_request_errors", "Requests refused or failed", [*labels, "type"],
                              registry=r)
        self.prompt_tokens = Counter("prefixserve_prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=r)
        self.generation_tokens = Counter("prefixserve_generation_tokens", "Generated tokens", labels, registry=r)
        self.queue_time = Histogram("prefixserve_queue_time_seconds", "Arrival to first scheduled step", labels,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("prefixserve_time_to_first_token_seconds", "Arrival to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("prefixserve_time_per_output_token_seconds", "Mean gap between output tokens",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        # (metric, its label names): the series _drop_deleted_tasks walks
        self._per_task = [(self.requests, (*labels, "finish_reason")), (self.errors, (*labels, "type")),
                          *((m, labels) for m in (self.prompt_tokens, self.generation_tokens, self.queue_time,
                                                  self.ttft, self.tpot))]
        self._adapters = engine.adapters
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        self._drop_deleted_tasks()
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput], tenant: str, engine_task: str | None
                    ) -> AsyncIterator[RequestOutput]:
        """Pass outputs through, observing them. Closing this closes `outputs` (aborting the request).
        `tenant` is the authenticated caller's; `engine_task` is `<tenant>/<task>` (None: the backbone)."""
        labels = None  # decided at the first output or error: by then the engine has resolved the task
        start, first_token_at, last, num_generated = time.monotonic(), None, None, 0
        try:
            async for out in outputs:
                labels = labels or self._labels(tenant, engine_task)
                num_generated += len(out.new_token_ids)  # every choice's (n > 1)
                if first_token_at is None and out.new_token_ids:
                    first_token_at = time.monotonic()
                    self.ttft.labels(*labels).observe(first_token_at - start)
                    if out.queue_time_s is not None:
                        self.queue_time.labels(*labels).observe(out.queue_time_s)
                last = out
                yield out
        except PrefixServeError as exc:
            self.errors.labels(*(labels or self._labels(tenant, engine_task)), exc.code).inc()
            raise
        finally:
            await outputs.aclose()
            if last is not None:
                self._finish(labels, last, first_token_at, num_generated)

    def _labels(self, tenant: str, engine_task: str | None) -> tuple[str, str]:
        if engine_task is None:
            return tenant, BASE_TASK
        if not self._adapters.knows(engine_task):
            return tenant, UNKNOWN_TASK
        return tenant, engine_task.removeprefix(f"{tenant}/")

    def _drop_deleted_tasks(self) -> None:
        """Remove the series of tasks deleted since (on any replica), so a stream of uploads and
        deletes cannot grow /metrics. Runs on the event loop, like every update of these series."""
        for metric, names in self._per_task:
            present = {tuple(sample.labels[n] for n in names) for family in metric.collect()
                       for sample in family.samples}
            for values in present:
                tenant, task = values[0], values[1]
                if task not in (BASE_TASK, UNKNOWN_TASK) and not self._adapters.knows(f"{tenant}/{task}"):
                    metric.remove(*values)

    def _finish(self, labels, last: RequestOutput, first_token_at: float | None, num_generated: int) -> None:
        self.requests.labels(*labels, last.finish_reason if last.finished else "abort").inc()
        self.prompt_tokens.labels(*labels).inc(last.num_prompt_tokens)
        self.generation_tokens.labels(*labels).inc(num_generated)
        # Time per output token of one choice (choices decode side by side, so the last one's count).
        if first_token_at is not None and last.num_output_tokens > 1:
            gap = (time.monotonic() - first_token_at) / (last.num_output_tokens - 1)
            self.tpot.labels(*labels).observe(gap)


class _EngineCollector:
    """Engine state read when Prometheus scrapes (plain reads of counters the engine thread keeps)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        e, adapters = self.engine, self.engine.adapters
        yield _gauge("prefixserve_running_requests", "Requests in the running batch", len(e.scheduler.running))
        yield _gauge("prefixserve_waiting_requests", "Requests waiting (incl. for their adapter)",
                     len(e.scheduler.waiting))
        yield _gauge("prefixserve_kv_pages_free", "Free pages of the KV pool", e.pages.num_free_pages)
        yield _gauge("prefixserve_kv_pages_total", "Pages of the KV pool", e.pages.num_pages)
        yield _gauge("prefixserve_adapters_on_device", "Adapter versions resident on the device",
                     len(adapters.resident))
        yield _gauge("prefixserve_host_cache_bytes", "Decoded adapters held in host memory", adapters.host.num_bytes)
        yield _counter("prefixserve_adapter_cold_loads", "Adapter versions fetched from the store for a request",
                       adapters.cold_loads)
        yield _counter("prefixserve_host_cache_hits", "Host cache hits", adapters.host.hits)
        yield _counter("prefixserve_host_cache_misses", "Host cache misses", adapters.host.misses)
        yield _counter("prefixserve_host_cache_evictions", "Host cache evictions", adapters.host.evictions)
        yield _counter("prefixserve_device_evictions", "Idle adapter versions dropped from the device for room",
                       adapters.device_evictions)
        yield from _gateway_gauges(e)


def _gateway_gauges(e: LLMEngine):
    """What the Kubernetes Gateway API Inference Extension's endpoint picker reads from a vLLM server,
    under vLLM's names: queue depth, KV-cache use, and which adapters are running and waiting (for
    its LoRA affinity). Adapters are named as clients name them in `model` (the task, without the
    tenant); only requests of registered tasks reach the scheduler, so the names are bounded."""
    # Copies taken in one C call each: the engine thread mutates these while we read.
    running, waiting = tuple(e.scheduler.running), tuple(e.scheduler.waiting)
    yield _gauge("vllm:num_requests_running", "Requests in the running batch", len(running))
    yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", len(waiting))
    yield _gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 0..1 (pages in use / pages)",
                 1.0 - e.pages.num_free_pages / e.pages.num_pages)
    lora = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters; the value is when this "
                             "was read", labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    lora.add_metric([_adapter_names(running), _adapter_names(waiting), str(e.max_loras)], time.time())
    yield lora


def _adapter_names(requests) -> str:
    return ",".join(sorted({r.task.partition("/")[2] for r in requests if r.task is not None}))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
