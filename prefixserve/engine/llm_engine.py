"""The synchronous engine: admit requests, and `step()` = schedule, run, sample, post-process."""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.store import AdapterStore
from prefixserve.config import EngineConfig
from prefixserve.engine.adapters import AdapterManager
from prefixserve.engine.bottleneck_pool import pool_rows_for as bottleneck_rows_for
from prefixserve.engine.detokenizer import IncrementalDetokenizer
from prefixserve.engine.fault_isolation import execute_by_version
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.lora_pool import DEFAULT_BUDGET_RANK, bytes_per_row, pool_rows_for
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.request import (
    Request,
    RequestGroup,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    TopLogprobs,
    check_context_room,
    check_unicode_text,
)
from prefixserve.engine.sampler import Sampler
from prefixserve.engine.scheduler import Scheduler
from prefixserve.engine.structured import GrammarCompiler
from prefixserve.errors import EngineOverloadedError, InvalidRequestError
from prefixserve.models.loader import Backbone, load_backbone

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A whole finished request (what `generate` returns)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None  # None for the first prompt token


class LLMEngine:
    def __init__(self, backbone: Backbone, config: EngineConfig = EngineConfig(), store: AdapterStore | None = None):
        """`store` holds the tasks' adapters; None gives a private LocalStore in a temporary
        directory (offline use and tests; servers pass a LocalStore or RedisStore)."""
        self.backbone = backbone
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        page_size = config.cache.page_size
        self.max_model_len = backbone.max_model_len
        num_pages = config.cache.num_pages or self._default_num_pages(backbone, config)
        self.pages = KVPageManager(num_pages, page_size)
        self.pool_tokens = num_pages * page_size  # what one request's own tokens can never outgrow
        # Vector rows (IA3, BitFit) are a few hundred KB each: room for every running sequence's task twice
        # over. Bottleneck rows (~280 KB on SmolLM2 fp32): max_num_seqs adapters of size 16.
        self.runner = ModelRunner(backbone, num_pages, page_size, self._lora_pool_rows(backbone, config),
                                  2 * config.scheduler.max_num_seqs,
                                  bottleneck_rows_for(config.scheduler.max_num_seqs,
                                                      config.adapters.max_bottleneck_size))
        self.store = store if store is not None else LocalStore(Path(tempfile.mkdtemp(prefix="prefixserve-adapters-")))
        self.adapters = AdapterManager(backbone, self.runner, self.pages, config.adapters, self.store,
                                       config.host_cache_bytes)
        self.scheduler = Scheduler(config.scheduler, self.pages, reclaim_pages=self.adapters.reclaim_pages)
        self.sampler = Sampler(backbone.eos_token_ids)
        self.requests: dict[str, Request] = {}  # by request id; a request's choices are "<id>#<index>"
        self.groups: dict[str, RequestGroup] = {}  # requests with n > 1, by the id their outputs carry
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig, store: AdapterStore | None = None) -> LLMEngine:
        return cls(load_backbone(config.model), config, store)

    def close(self) -> None:
        """Stop the adapter loaders and release the store (its connections and event thread)."""
        self.adapters.close()
        self.store.close()

    @property
    def max_loras(self) -> int:
        """Adapters of rank 16 the LoRA pool holds at once (more of lower ranks, fewer of higher):
        what vLLM's max_lora label means to a LoRA-affinity router."""
        return self.runner.lora_pool.max_rows // DEFAULT_BUDGET_RANK

    @staticmethod
    def _lora_pool_rows(backbone: Backbone, config: EngineConfig) -> int:
        dtype = next(backbone.model.parameters()).dtype
        budget = config.lora_memory_bytes
        if budget is None:
            ranks = max(config.scheduler.max_num_seqs * DEFAULT_BUDGET_RANK, config.adapters.max_lora_rank)
            budget = ranks * bytes_per_row(backbone.arch, dtype)
        return pool_rows_for(backbone.arch, dtype, budget, config.adapters.max_lora_rank)

    @staticmethod
    def _default_num_pages(backbone: Backbone, config: EngineConfig) -> int:
        dtype = next(backbone.model.parameters()).dtype
        per_page = ModelRunner.bytes_per_page(backbone, config.cache.page_size, dtype)
        wanted = config.scheduler.max_num_seqs * -(-backbone.max_model_len // config.cache.page_size)
        return max(1, min(wanted, config.cache.kv_cache_bytes // per_page))

    # ---- admission -------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | None = None,
        params: SamplingParams = SamplingParams(),
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        tenant: str = "default",
        task: str | None = None,
        tenant_weight: float = 1.0,
    ) -> Request:
        """Tokenize and validate; touches no engine state (safe from any thread)."""
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("expected exactly one of prompt (text) or prompt_token_ids")
        tokenizer = self.backbone.tokenizer
        if prompt is not None:
            if tokenizer is None:
                raise InvalidRequestError("this backbone has no tokenizer; send prompt_token_ids instead of text")
            check_unicode_text(prompt, "the prompt")
            prompt_token_ids = tokenizer(prompt).input_ids
        ids = list(prompt_token_ids)
        vocab = self.backbone.arch.vocab_size
        if not ids:
            raise InvalidRequestError("the prompt is empty; expected at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}), found "
                                      f"{next(t for t in ids if not (isinstance(t, int) and 0 <= t < vocab))!r}")
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab}), found {bad_stop[0]}")
        bad_bias = [t for t, _ in params.logit_bias if t >= vocab]
        if bad_bias:
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab}), found {bad_bias[0]}")
        grammar = self._matcher(params)  # compiled here, on the caller's thread: a bad schema is a 400
        version = self.adapters.resolve(task)  # pinned now: a later upload does not affect this request
        # The task's virtual tokens are known here only if its version is resident; pinning checks again.
        check_context_room(len(ids), self.adapters.prefix_len(version), params.max_new_tokens, self.max_model_len)
        total = len(ids) + (params.max_new_tokens or 1)  # no limit given: it stops where the pool ends
        if self.pages.pages_for(total) > self.pages.num_pages:
            raise InvalidRequestError(f"the request needs up to {total} tokens of KV cache, more than the whole "
                                      f"pool ({self.pool_tokens} tokens)")
        if not (math.isfinite(tenant_weight) and tenant_weight > 0):
            raise InvalidRequestError(f"expected a positive tenant weight, found {tenant_weight}")
        request = Request(request_id or uuid.uuid4().hex, ids, params, tenant=tenant, task=task,
                          task_version=version, tenant_weight=tenant_weight)
        request.grammar = grammar
        return request

    def _matcher(self, params: SamplingParams):
        if params.structured is None:
            return None
        tokenizer = self.backbone.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("structured outputs need the backbone's tokenizer, and this backbone has none")
        with self._grammars_lock:  # built once, on first use (it reads the whole vocabulary)
            if self._grammars is None:
                self._grammars = GrammarCompiler(tokenizer, self.backbone.arch.vocab_size,
                                                 self.backbone.eos_token_ids)
        return self._grammars.matcher(self._grammars.compile(params.structured))

    def add(self, request: Request) -> None:
        if request.request_id in self.requests or request.output_id in self.groups:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        limit = self.config.scheduler.max_in_flight
        if self.scheduler.num_unfinished >= limit:
            raise EngineOverloadedError(f"the engine queue is full ({limit} requests in flight)")
        self.adapters.begin(request)  # pins a resident version, or starts loading it (the request waits)
        if self.backbone.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.backbone.tokenizer, request.prompt_token_ids)
        self.requests[request.request_id] = request
        if request.group is not None:
            self.groups[request.output_id] = request.group
        self.scheduler.add(request)

    def add_request(self, prompt: str | None = None, params: SamplingParams = SamplingParams(),
                    **kwargs) -> Request:
        request = self.make_request(prompt, params, **kwargs)
        self.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request (every choice of it); returns its last output, None if it is not here."""
        group = self.groups.get(request_id)
        members = list(group.members) if group is not None else [self.requests.get(request_id)]
        if members[-1] is None:
            return None
        for request in members:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return self._output(members[-1], [], None)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        if request.adapter is not None:
            self.adapters.release(request.adapter)
        else:
            self.adapters.forget(request)
        del self.requests[request.request_id]
        group = request.group
        if group is not None:
            group.members.remove(request)
            group.forked = True  # a request that ends before its prompt is prefilled never forks
            if group.finished:
                del self.groups[request.output_id]

    # ---- tasks -------------------------------------------------------------------------------
    def register_adapter(self, task: str, data: bytes) -> Artifact:
        """Validate an adapter artifact and serve it as `task` from the next request on."""
        return self.adapters.register(task, data)

    def unregister_adapter(self, task: str) -> None:
        self.adapters.unregister(task)
        self.adapters.free_stale()

    def rollback_adapter(self, task: str, version: str | None = None) -> str:
        version = self.adapters.rollback(task, version)
        self.adapters.free_stale()
        return version

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._poll_adapters()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if self.adapters.num_loading:  # only loads are pending: wait for one rather than spin
                self.adapters.wait_for_load(timeout=0.01)
            return outputs
        try:
            result, failed = self.runner.execute(scheduled), {}
        except Exception:  # one task version's weights must not stop the loop for everyone: find it
            logger.exception("the step failed; running it again one task version at a time")
            result, failed = execute_by_version(self.runner, scheduled)  # raises if the engine itself is broken
            outputs += self._fail_versions(failed)
        for request, n in zip(scheduled.requests, scheduled.num_new_tokens):
            if request.task_version not in failed:
                request.num_computed_tokens += n
        for scored in result.prompt_logprobs:
            scored.request.prompt_logprobs += scored.logprobs
            scored.request.prompt_top_logprobs += scored.top_logprobs
        requests, logits = result.sampling_requests, result.logits
        if any(r.group is not None and not r.group.forked for r in requests):
            requests, logits = self._fork_choices(requests, logits)
        if not requests:
            return outputs
        try:
            sample = self.sampler(logits, requests)
        except Exception:  # one request's parameters must not stop the loop for everyone: find it
            return outputs + self._sample_each(logits, requests)
        for i, (request, token) in enumerate(zip(requests, sample.tokens)):
            outputs.append(self._append_token(request, token, sample.logprobs[i] if sample.logprobs else None,
                                              sample.top_logprobs[i] if sample.top_logprobs else None))
        return outputs

    def _sample_each(self, logits: torch.Tensor, requests: list[Request]) -> list[RequestOutput]:
        """Sample row by row; a request whose row cannot be sampled ends with an error, the rest go on."""
        outputs = []
        for i, request in enumerate(requests):
            try:
                sample = self.sampler(logits[i:i + 1], [request])
            except Exception as exc:
                logger.exception("sampling failed for request %s", request.request_id)
                outputs.append(self._fail(request, InvalidRequestError(
                    f"the request's sampling parameters could not be applied ({type(exc).__name__}: {exc}); "
                    "the request was stopped")))
                continue
            outputs.append(self._append_token(request, sample.tokens[0],
                                              sample.logprobs[0] if sample.logprobs else None,
                                              sample.top_logprobs[0] if sample.top_logprobs else None))
        return outputs

    def _fail(self, request: Request, error: Exception) -> RequestOutput:
        self._finish(request, RequestStatus.FINISHED_ERROR)
        output = self._output(request, [], None)
        output.error = error
        return output

    # ---- n > 1: choices fork after the prompt ------------------------------------------------
    def _fork_choices(self, requests: list[Request], logits: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Requests with n > 1 whose prompt was just prefilled become n choices. The new choices
        sample from the same logits row this step; each then decodes on its own."""
        expanded, rows = [], []
        for row, request in enumerate(requests):
            expanded.append(request)
            rows.append(row)
            if request.group is not None and not request.group.forked:
                for choice in self._fork(request):
                    expanded.append(choice)
                    rows.append(row)
        return expanded, logits[torch.tensor(rows, device=logits.device)]

    def _fork(self, parent: Request) -> list[Request]:
        """Make the other n - 1 choices of `parent`; returns those that share its computed prompt
        (the rest, if the pool has no page for their copy, wait and prefill the prompt themselves)."""
        group = parent.group
        group.forked = True
        ready = []
        for index in range(1, group.n):
            choice = Request(f"{parent.request_id}#{index}", parent.prompt_token_ids, parent.params,
                             tenant=parent.tenant, tenant_weight=parent.tenant_weight, task=parent.task,
                             task_version=parent.task_version, arrival_time=parent.arrival_time, index=index,
                             output_id=parent.output_id, group=group)
            choice.first_scheduled_time = parent.first_scheduled_time
            # Prompt logprobs are the same for every choice: computed once, the list shared.
            choice.prompt_logprobs, choice.prompt_top_logprobs = parent.prompt_logprobs, parent.prompt_top_logprobs
            choice.grammar = parent.grammar.copy() if parent.grammar is not None else None
            if self.backbone.tokenizer is not None:
                choice.detokenizer = IncrementalDetokenizer(self.backbone.tokenizer, choice.prompt_token_ids)
            if parent.adapter is not None:
                self.adapters.share(choice, parent.adapter)
            group.members.append(choice)
            self.requests[choice.request_id] = choice
            if self._share_prompt_pages(parent, choice):
                self.scheduler.add_running(choice)
                ready.append(choice)
            else:
                self.scheduler.add(choice)
        return ready

    def _share_prompt_pages(self, parent: Request, choice: Request) -> bool:
        """The prompt's full pages are shared read-only (nobody writes below the prompt's end); the
        last, partly filled one is copied, since each choice writes its own tokens after the prompt."""
        num_tokens = parent.num_prompt_tokens
        full, partial = divmod(num_tokens, self.pages.page_size)
        copy = []
        if partial:
            if not self.pages.can_allocate(1):
                self.adapters.reclaim_pages(1)
            if not self.pages.can_allocate(1):
                return False
            copy = self.pages.allocate(1)
            self.runner.copy_slots(parent.page_ids[full], copy[0], partial)
        self.pages.share(parent.page_ids[:full])
        choice.page_ids = parent.page_ids[:full] + copy
        choice.num_computed_tokens = num_tokens
        return True

    def _fail_versions(self, failed: dict[str, Exception]) -> list[RequestOutput]:
        """Quarantine each version a step failed for and end every request holding it with that error."""
        outputs = []
        for version, exc in failed.items():
            error = self.adapters.quarantine(version, exc)
            for request in [r for r in self.requests.values() if r.task_version == version]:
                # A half-run forward may have left NaN in its pages (pages a choice shares are the
                # same version's, so they end here too).
                self.runner.clear_pages(request.page_ids)
                outputs.append(self._fail(request, error))
        return outputs

    def _poll_adapters(self) -> list[RequestOutput]:
        """Requests whose adapter finished loading become schedulable; those it failed for end now."""
        outputs = []
        for request, error in self.adapters.poll():
            if error is not None and request.request_id in self.requests:
                outputs.append(self._fail(request, error))
        return outputs

    def _append_token(self, request: Request, token: int, logprob: float | None,
                      top: TopLogprobs | None = None) -> RequestOutput:
        params = request.params
        if request.grammar is not None:
            try:
                request.grammar.accept(token)
            except Exception as exc:  # the mask should make this impossible; if not, only this request ends
                logger.exception("the grammar refused the token of request %s", request.request_id)
                return self._fail(request, InvalidRequestError(
                    f"the structured output could not continue ({type(exc).__name__}: {exc}); the request was "
                    "stopped"))
        request.token_ids.append(token)
        logprob = logprob if params.logprobs else None
        top = top if params.top_logprobs else None
        if logprob is not None:
            request.logprobs.append(logprob)
        if top is not None:
            request.top_logprobs.append(top)
        detok = request.detokenizer
        delta = detok.add(token) if detok is not None else ""
        status = self._check_stop(request, token, delta)
        if status is not None:
            self._finish(request, status)
        return self._output(request, [token], logprob, top)

    def _check_stop(self, request: Request, token: int, delta: str) -> RequestStatus | None:
        params = request.params
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in self.backbone.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.grammar is not None and request.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED  # the output is complete: the grammar allows nothing more
        if params.stop and delta:
            detok = request.detokenizer
            # A stop string can only end inside the new text, so search just the tail.
            start = max(0, len(detok.text) - len(delta) - max(map(len, params.stop)) + 1)
            hits = [(detok.text.find(s, start), s) for s in params.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, request.stop_reason = min(hits)
                detok.text = detok.text[:at]
                return RequestStatus.FINISHED_STOPPED
        prefix_len = request.adapter.prefix_len if request.adapter is not None else 0
        # Without a limit of its own a request may not outgrow the KV pool (it could never be scheduled).
        max_new_tokens = params.max_new_tokens or self.pool_tokens - request.num_prompt_tokens
        if request.num_output_tokens >= max_new_tokens or prefix_len + request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(self, request: Request, new_tokens: list[int], logprob: float | None,
                top: TopLogprobs | None = None) -> RequestOutput:
        finished = request.status.is_finished
        detok = request.detokenizer
        new_text = ""
        if detok is not None:
            visible = detok.text
            if not finished and request.params.stop:
                # Hold back what could be the start of a stop string until it is decided.
                held_back = max(map(len, request.params.stop)) - 1
                visible = visible[:max(request.num_emitted_chars, len(visible) - held_back)]
            new_text = visible[request.num_emitted_chars:]
            request.num_emitted_chars = len(visible)
        first_token = bool(new_tokens) and request.num_output_tokens == 1
        queue_time = None
        if first_token and request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        output = RequestOutput(
            request_id=request.output_id, new_token_ids=new_tokens, new_text=new_text,
            finished=request.group.finished if request.group is not None else finished,
            finish_reason=request.status.finish_reason, num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            new_logprobs=[logprob] if logprob is not None else None, queue_time_s=queue_time,
            new_top_logprobs=[top] if top is not None else None, index=request.index, choice_finished=finished,
        )
        if first_token and request.params.prompt_logprobs is not None:
            output.prompt_logprobs = [None, *request.prompt_logprobs]
            output.prompt_token_ids = request.prompt_token_ids
            if request.params.prompt_logprobs:
                output.prompt_top_logprobs = [None, *request.prompt_top_logprobs]
        return output

    # ---- offline convenience -------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams = SamplingParams(),
                 tasks: list[str | None] | None = None) -> list[Completion]:
        """Run every prompt to completion in one continuous batch (tests, benchmarks, CLI);
        tasks[i] (None = plain backbone) steers prompt i."""
        order = []
        for i, p in enumerate(prompts):
            kwargs = {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
            order.append(self.add_request(params=params, task=tasks[i] if tasks else None, **kwargs))
        while self.has_unfinished():
            self.step()
        return [self.completion(r) for r in order]

    @staticmethod
    def completion(request: Request) -> Completion:
        detok, params = request.detokenizer, request.params
        return Completion(request.request_id, request.prompt_token_ids, request.output_token_ids,
                          detok.text if detok is not None else "", request.status.finish_reason,
                          request.logprobs if params.logprobs else None,
                          request.top_logprobs if params.top_logprobs else None,
                          [None, *request.prompt_logprobs] if params.prompt_logprobs is not None else None)
