"""Finding whose fault a failed step was. When the batch's forward raises, it is run again one task
version at a time: the versions whose part fails again are to blame (quarantined, their requests
ended by the engine) and the others' part of the step goes on. Only when the plain backbone's part
fails too, or every version's part does, is the engine itself broken."""

from __future__ import annotations

import logging

import torch

from prefixserve.engine.model_runner import ModelRunner, StepResult
from prefixserve.engine.scheduler_output import SchedulerOutput

log = logging.getLogger(__name__)


def execute_by_version(runner: ModelRunner, step: SchedulerOutput) -> tuple[StepResult, dict[str, Exception]]:
    """Run `step` again in one forward per task version. Returns the merged result of the parts that
    ran and, per version whose part failed, its error; raises when the engine itself is broken.
    Re-running is safe: no request's counters moved, and a part rewrites the same KV slots."""
    parts: dict[str | None, SchedulerOutput] = {}
    for request, num_new_tokens in zip(step.requests, step.num_new_tokens):
        part = parts.setdefault(request.task_version, SchedulerOutput())
        part.requests.append(request)
        part.num_new_tokens.append(num_new_tokens)
    logits, sampling, scored, failed = [], [], [], {}
    for version, part in parts.items():
        try:
            result = runner.execute(part)
        except Exception as exc:
            if version is None:
                raise  # the plain backbone cannot run: no task is to blame
            log.exception("the step failed again for task version %s alone", version)
            failed[version] = exc
            continue
        logits.append(result.logits)  # [num_sampling_in_part, vocab]
        sampling += result.sampling_requests
        scored += result.prompt_logprobs
    if len(parts) > 1 and len(failed) == len(parts):
        raise next(iter(failed.values()))  # every version fails on its own: the engine is what is broken
    return StepResult(torch.cat(logits) if logits else torch.empty(0), sampling, scored), failed
