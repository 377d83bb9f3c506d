"""The HTTP contract of the training job API: the job spec a tenant submits, and the job record it reads
back (pydantic; imports nothing heavy, so the SDK can share them).

Types are strict and unknown fields are refused, as in the other request schemas ("5" for `steps` is a
400). Which values a field accepts (ranges, names, the shape of an example) is documented here with
`accepts` but checked by `parse_job_spec`, the one validator of a spec for the API, the CLI and the
queues, so a refusal keeps its message naming the field and what was expected."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, WithJsonSchema

from prefixserve.engine.task_pointers import MAX_TASK_NAME_CHARS, TASK_NAME_PATTERN
from prefixserve.server.protocol import SEED, ErrorBody, accepts
from prefixserve.training.queue import JobStatus
from prefixserve.training.spec import (
    BOTTLENECK_ACTIVATIONS,
    BOTTLENECK_PLACEMENTS,
    MAX_BOTTLENECK_SIZE,
    MAX_EXAMPLE_CHARS,
    MAX_EXAMPLES,
    MAX_INSTRUCTION_CHARS,
    MAX_SOURCES,
    MAX_STEPS,
    TRAINABLE_KINDS,
    Hyperparameters,
)

_DEFAULTS = Hyperparameters()
_TASK = {"type": "string", "minLength": 1, "maxLength": MAX_TASK_NAME_CHARS, "pattern": TASK_NAME_PATTERN}
_TEXT = {"type": "string", "maxLength": MAX_EXAMPLE_CHARS}
_MESSAGE = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
            "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": _TEXT}}
_EXAMPLE = {"oneOf": [
    {"title": "InputOutputExample", "type": "object", "required": ["input", "output"], "additionalProperties": False,
     "properties": {"input": _TEXT, "output": {**_TEXT, "pattern": r"\S"}}},
    {"title": "ChatExample", "type": "object", "required": ["messages"], "additionalProperties": False,
     "description": "The last message is a non-empty assistant turn: the output the loss is taken on",
     "properties": {"messages": {"type": "array", "minItems": 2, "items": _MESSAGE}}},
]}
_EXAMPLES = {"type": "array", "maxItems": MAX_EXAMPLES, "items": _EXAMPLE}
_SOURCE = {"oneOf": [
    {"title": "ExamplesSource", "type": "object", "required": ["task", "examples"], "additionalProperties": False,
     "properties": {"task": _TASK, "examples": {**_EXAMPLES, "minItems": 1}}},
    {"title": "SuiteSource", "type": "object", "required": ["task", "suite_task"], "additionalProperties": False,
     "properties": {"task": _TASK, "suite_task": {"type": "string"}}},
]}
# An example or a source is any JSON object to pydantic, documented as the shapes parse_job_spec accepts: its
# messages say which example is wrong ("examples[3]: expected ..."), which pydantic's union errors would not.
Example = Annotated[dict[str, Any], WithJsonSchema(_EXAMPLE)]
Source = Annotated[dict[str, Any], WithJsonSchema(_SOURCE)]


def _ints(minimum: int, maximum: int) -> Any:
    return accepts(integer={"minimum": minimum, "maximum": maximum})


def _names(*names: str) -> Any:
    return accepts(string={"enum": list(names)})


class TrainingHyperparameters(BaseModel):
    """All optional; each kind reads only its own (see `prefixserve.training.spec.Hyperparameters`)."""

    model_config = ConfigDict(extra="forbid")

    steps: StrictInt = Field(_DEFAULTS.steps, json_schema_extra=_ints(1, MAX_STEPS))
    learning_rate: StrictFloat | None = Field(
        None, description="Null: the kind's measured default",
        json_schema_extra=accepts(number={"exclusiveMinimum": 0, "maximum": 10}))
    batch_size: StrictInt = Field(_DEFAULTS.batch_size, json_schema_extra=_ints(1, 1024))
    max_length: StrictInt = Field(_DEFAULTS.max_length, json_schema_extra=_ints(2, 32_768),
                                  description="Prompt + output tokens of one example; a longer one fails the job")
    eval_max_new_tokens: StrictInt = Field(_DEFAULTS.eval_max_new_tokens, json_schema_extra=_ints(1, 512))
    eval_every: StrictInt = Field(_DEFAULTS.eval_every, json_schema_extra=_ints(0, MAX_STEPS),
                                  description="Steps between progress evaluations; 0: only at the end")
    warmup_steps: StrictInt | None = Field(
        None, json_schema_extra=_ints(0, MAX_STEPS),
        description="prefix / prompt / ptuning / lora / ia3 / bitfit / adapter: steps of linear learning-rate "
                    "warm-up; null: the kind's default (prefix: a fifth of the steps, else 0)")
    decay: StrictStr | None = Field(
        None, json_schema_extra=_names("constant", "cosine"),
        description="After warm-up the rate stays ('constant') or follows a cosine to a tenth of it ('cosine'); "
                    "null: the kind's default (prefix: cosine, else constant)")
    num_virtual_tokens: StrictInt = Field(_DEFAULTS.num_virtual_tokens, json_schema_extra=_ints(1, 512))
    init: StrictStr = Field(_DEFAULTS.init, json_schema_extra=_names("text", "random"))
    init_text: StrictStr | None = Field(
        None, description="prompt / prefix with init 'text': the text to start from (else the task's instruction)",
        json_schema_extra=accepts(string={"minLength": 1, "maxLength": MAX_EXAMPLE_CHARS}))
    encoder: StrictStr = Field(_DEFAULTS.encoder, json_schema_extra=_names("mlp", "lstm"))
    encoder_hidden: StrictInt = Field(_DEFAULTS.encoder_hidden, json_schema_extra=_ints(1, 16_384))
    rank: StrictInt = Field(_DEFAULTS.rank, json_schema_extra=_ints(1, 256))
    alpha: StrictFloat = Field(_DEFAULTS.alpha, json_schema_extra=accepts(number={"exclusiveMinimum": 0}))
    targets: list[StrictStr] = Field(list(_DEFAULTS.targets),
                                     json_schema_extra=accepts(array={"minItems": 1, "maxItems": 7}))
    ia3_targets: list[StrictStr] = Field(
        list(_DEFAULTS.ia3_targets), description="ia3: the projections a learned vector scales (names as for targets)",
        json_schema_extra=accepts(array={"minItems": 1, "maxItems": 7, "uniqueItems": True}))
    ia3_feedforward: list[StrictStr] = Field(
        list(_DEFAULTS.ia3_feedforward), description="ia3: those of ia3_targets whose input is scaled, not output",
        json_schema_extra=accepts(array={"maxItems": 7, "uniqueItems": True}))
    bitfit_targets: list[StrictStr] = Field(
        list(_DEFAULTS.bitfit_targets), description="bitfit: the projections whose output a learned bias shifts "
                                                    "(names as for targets; default all seven)",
        json_schema_extra=accepts(array={"minItems": 1, "maxItems": 7, "uniqueItems": True}))
    bottleneck_size: StrictInt = Field(
        _DEFAULTS.bottleneck_size, json_schema_extra=_ints(1, MAX_BOTTLENECK_SIZE),
        description="adapter: units of each bottleneck (a worker started with a lower --max-bottleneck-size "
                    "fails a larger job)")
    bottleneck_placements: list[StrictStr] = Field(
        list(_DEFAULTS.bottleneck_placements),
        description="adapter: the sublayers whose output a bottleneck follows, sorted: both (Houlsby's, the default) "
                    "or ['mlp'] (Pfeiffer's)",
        json_schema_extra=accepts(array={"minItems": 1, "maxItems": len(BOTTLENECK_PLACEMENTS), "uniqueItems": True,
                                         "items": {"enum": list(BOTTLENECK_PLACEMENTS)}}))
    bottleneck_activation: StrictStr = Field(_DEFAULTS.bottleneck_activation,
                                             description="adapter: the activation between down and up",
                                             json_schema_extra=_names(*BOTTLENECK_ACTIVATIONS))
    intrinsic_dim: StrictInt = Field(_DEFAULTS.intrinsic_dim, json_schema_extra=_ints(1, 1024))
    decoder_hidden: StrictInt = Field(_DEFAULTS.decoder_hidden, json_schema_extra=_ints(1, 16_384))
    mse_weight: StrictFloat = Field(_DEFAULTS.mse_weight, json_schema_extra=accepts(number={"minimum": 0}))
    subspace: StrictStr | None = Field(None, description="intrinsic: the published subspace task it is decoded by",
                                       json_schema_extra=accepts(string=_TASK))


class TrainingJobRequest(BaseModel):
    """A job spec: `examples` or a built-in `suite_task` (a `subspace` job: `sources` instead)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "colors", "kind": "prompt", "suite_task": "made_up_color", "hyperparameters": {"steps": 200}},
        {"task": "support", "kind": "lora", "examples": [{"input": "Where is my order?", "output": "Let me check."}],
         "eval_fraction": 0, "hyperparameters": {"rank": 8, "learning_rate": 1e-3}, "seed": 1},
    ]})

    task: StrictStr = Field(description="The task the job publishes to", json_schema_extra=accepts(string=_TASK))
    kind: StrictStr = Field(json_schema_extra=_names(*TRAINABLE_KINDS))
    examples: list[Example] = Field(default_factory=list, json_schema_extra=accepts(array={"maxItems": MAX_EXAMPLES}))
    suite_task: StrictStr | None = Field(None, description="A task of prefixserve.training.tasks")
    eval_examples: list[Example] = Field(default_factory=list,
                                         json_schema_extra=accepts(array={"maxItems": MAX_EXAMPLES}))
    eval_fraction: StrictFloat = Field(0.2, description="Of `examples`, held out when there are no eval_examples",
                                       json_schema_extra=accepts(number={"minimum": 0, "exclusiveMaximum": 1}))
    hyperparameters: TrainingHyperparameters = Field(default_factory=TrainingHyperparameters)
    seed: StrictInt = Field(0, json_schema_extra=SEED)
    sources: list[Source] = Field(default_factory=list, json_schema_extra=accepts(array={"maxItems": MAX_SOURCES}),
                                  description="subspace jobs only: the prompt tasks it learns from")
    instruction: StrictStr | None = Field(
        None, description="What you would otherwise write in the prompt: scored as a baseline the trained task "
                          "is compared with, and the text a soft prompt starts from",
        json_schema_extra=accepts(string={"maxLength": MAX_INSTRUCTION_CHARS, "pattern": r"\S"}))

    def submitted(self) -> dict[str, Any]:
        """The fields the client sent, as plain JSON data for `parse_job_spec` (the defaults stay its own)."""
        return self.model_dump(exclude_unset=True)


class TrainingProgress(BaseModel):
    """The latest progress event of a running job (a diverged loss reads null)."""

    # Written by a worker, which may run a newer version than this server: what it adds is passed on.
    model_config = ConfigDict(extra="allow")

    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None = None
    eval_metrics: dict[str, float | None] | None = None


class TrainingJob(BaseModel):
    """A job's record as its tenant sees it: its own task name, no worker internals. Every field of
    `JobRecord` is named here or dropped by `public` (extra is refused), so one it gains cannot go unnoticed."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    task: str
    kind: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(0, description="Claims by workers so far")
    progress: TrainingProgress | None = None
    metrics: dict[str, float | None] | None = Field(
        None, description="Train and eval loss, exact match, label accuracy; the plain backbone's baselines "
                    "(zero_shot_, instruction_, k_shot_, majority_exact_match), best_baseline_exact_match and "
                    "lift_over_best_baseline")
    version: str | None = Field(None, description="The published version (while publishing: the version being put)")
    error: ErrorBody | None = None


class TrainingJobList(BaseModel):
    jobs: list[TrainingJob]  # newest first
