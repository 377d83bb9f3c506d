"""The built-in task suite: short-input, short-output tasks built by code from material inside installed
packages (nothing is downloaded), for training and scoring adapters by exact match of greedy outputs.

Families: arbitrary word -> label mappings and fixed rules over words (the backbone alone is near
chance), sentiment from the VADER lexicon, ISO lookups from pycountry, E2E-style data-to-text built
with faker, and (added to widen Intrinsic Prompt Tuning's source tasks) file types, numbers in words
and sums, calendar dates, kinds of named entities, and copying with an edit. A task built twice
with the same seed gives the same examples in any process.

Sizes: eval always gets `num_eval` examples; train gets `num_train`, or fewer where the material runs
out (the pycountry tables hold 118-237 rows). TrainingDataError if not even eval plus one train
example fit."""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefixserve.errors import TrainingDataError, expect
from prefixserve.training.tasks import (
    arithmetic,
    data_to_text,
    dates,
    entities,
    files,
    lookups,
    mapping,
    rules,
    sentiment,
    transforms,
)
from prefixserve.training.tasks.common import TaskSpec


@dataclass(frozen=True)
class TaskData:
    name: str
    instruction: str  # one sentence describing the task (initialises prompt tuning from text)
    labels: tuple[str, ...] | None  # distinct outputs for classification tasks, else None
    near_chance: bool  # the backbone alone cannot know the answers
    family: str  # FAMILIES
    train: list[dict]  # [{"input": str, "output": str}, ...]; inputs disjoint from eval's
    eval: list[dict]


# Registration order is the suite's order (TASK_NAMES); new families go last so older tasks keep their place.
_MODULES = (mapping, rules, sentiment, lookups, data_to_text, files, arithmetic, dates, entities, transforms)
_REGISTRY: dict[str, TaskSpec] = {name: spec for module in _MODULES for name, spec in module.TASKS.items()}
TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(spec.family for spec in _REGISTRY.values()))


def build_task(name: str, *, seed: int = 0, num_train: int = 256, num_eval: int = 64) -> TaskData:
    """The task's fixed train/eval splits for `seed` (see the module docstring for sizes)."""
    spec = _REGISTRY.get(name)
    expect(spec is not None, TrainingDataError, f"unknown task {name!r}; built-in tasks are: {', '.join(TASK_NAMES)}")
    expect(num_train >= 1 and num_eval >= 1, TrainingDataError,
           f"task {name!r} needs num_train >= 1 and num_eval >= 1, got {num_train} and {num_eval}")
    # A string seed is hashed with SHA-512 by `random`, so it is the same in every process.
    rng = random.Random(f"{name}:{seed}")
    try:
        train, eval_ = spec.make(rng, num_train, num_eval)
    except TrainingDataError as e:
        raise TrainingDataError(f"task {name!r}: {e.message}") from None
    return TaskData(name=name, instruction=spec.instruction, labels=spec.labels, near_chance=spec.near_chance,
                    family=spec.family, train=train, eval=eval_)
