"""The contract between scheduler and model runner, in its own module so the runner imports the
contract, not the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixserve.engine.request import Request


@dataclass
class SchedulerOutput:
    """The contract between scheduler and model runner: a plain description of one step."""

    requests: list[Request] = field(default_factory=list)  # batch order
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each request computes this step
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)
