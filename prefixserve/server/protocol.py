"""Request and response schemas of the HTTP API (pydantic; imports nothing heavy, so the SDK can share them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator


def accepts(**keywords_by_type: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A field's `json_schema_extra` that documents which values it accepts, as JSON-schema keywords
    per JSON type (`accepts(number={"minimum": 0})`) put on that type's branch of its schema. Only the
    OpenAPI changes: the check that refuses the rest (SamplingParams, a validator) keeps its message."""
    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            branch.update(keywords_by_type.get(branch.get("type"), {}))
    return extra


# What SamplingParams accepts, for the OpenAPI of both the native and the OpenAI-compatible API.
NON_NEGATIVE = accepts(number={"minimum": 0}, integer={"minimum": 0})
TOP_P = accepts(number={"exclusiveMinimum": 0, "maximum": 1})
TOP_K = accepts(integer={"minimum": -1})
SEED = accepts(integer={"minimum": 0, "maximum": 2**63 - 1})
_STOP_STRING = {"minLength": 1, "maxLength": 512}  # SamplingParams' MAX_STOP_CHARS (the engine is not imported here)
STOP = accepts(string=_STOP_STRING, array={"items": {"type": "string", **_STOP_STRING}, "maxItems": 16})
STOP_TOKEN_IDS = accepts(array={"items": {"type": "integer", "minimum": 0}})


# Mirrors of SamplingParams' bounds (the engine is not imported here; it checks them again).
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
PENALTY = accepts(number={"minimum": -2, "maximum": 2}, integer={"minimum": -2, "maximum": 2})
MAX_GRAMMAR_CHARS = 65536  # a schema, regex or grammar as text: bounds compile work before any starts


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} : any JSON value
    strict: StrictBool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError(f"expected json_schema exactly when type is 'json_schema', found type {self.type!r} "
                             f"{'with' if self.json_schema is not None else 'without'} json_schema")
        return self


class SteeringFields(BaseModel):
    """What both APIs add to plain sampling: penalties, logit_bias and structured outputs (OpenAI's
    `response_format` and vLLM's guided_* extensions; at most one of them per request)."""

    presence_penalty: StrictFloat | None = Field(None, json_schema_extra=PENALTY)
    frequency_penalty: StrictFloat | None = Field(None, json_schema_extra=PENALTY)
    repetition_penalty: StrictFloat | None = Field(None, gt=0, le=100)  # vLLM's; 1 = off
    # token id (as a string, JSON keys are strings) -> bias, clamped to [-100, 100] as OpenAI does
    logit_bias: dict[str, StrictFloat] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # a JSON schema (object or its text)
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)  # Lark (llguidance)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):  # "²" is a digit to isdigit, not to int
                raise ValueError(f"expected logit_bias keys to be token ids (decimal strings such as \"1234\"), "
                                 f"found {key!r:.40}")
        return bias

    @model_validator(mode="after")
    def _one_format(self):
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"expected at most one structured output option, found {', '.join(given)}")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(SteeringFields):
    # Numbers and booleans are strict: "5" or 1.0 for max_new_tokens, or 1 for a flag, is a 400 rather than
    # a guess (a float field still takes a JSON integer such as 0 or 1).
    model_config = ConfigDict(extra="forbid")

    task: str | None = None  # None / "base": the plain backbone (adapters arrive with the tasks API)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_new_tokens: StrictInt = Field(16, json_schema_extra=accepts(integer={"minimum": 1}))
    temperature: StrictFloat = Field(1.0, json_schema_extra=NON_NEGATIVE)
    top_p: StrictFloat = Field(1.0, json_schema_extra=TOP_P)
    top_k: StrictInt = Field(0, json_schema_extra=TOP_K)
    seed: StrictInt | None = Field(None, json_schema_extra=SEED)
    stop: list[str] | str | None = Field(None, json_schema_extra=STOP)
    stop_token_ids: list[StrictInt] | None = Field(None, json_schema_extra=STOP_TOKEN_IDS)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, json_schema_extra=NON_NEGATIVE)
    logprobs: StrictBool = False
    top_logprobs: StrictInt = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token (implies logprobs)
    stream: StrictBool = False

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected exactly one of 'prompt' or 'messages'")
        return self


class GenerateResponse(BaseModel):
    id: str
    task: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None  # per token: token id (as a string) -> logprob


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class GenerateChunk(BaseModel):
    """One event of `/v1/generate` with `"stream": true`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


class TaskVersion(BaseModel):
    task: str
    kind: str
    version: str
    num_bytes: int


class TaskListEntry(BaseModel):
    task: str
    version: str


class TaskList(BaseModel):
    tasks: list[TaskListEntry]


class TaskRecord(BaseModel):
    version: str
    kind: str
    num_bytes: int
    created_at: float
    card: dict[str, Any] | None = Field(None, description="How the version was made, when a training job made it")


class TaskInfo(TaskVersion):
    residency: Literal["device", "host", "store"]
    card: dict[str, Any] | None = Field(
        None, description="The current version's task card when a training job made it: job_id, kind, "
                          "hyperparameters, num_train/num_eval examples, num_parameters, and metrics with the "
                          "plain backbone's baselines (best_baseline, lift_over_best_baseline)")
    history: list[TaskRecord]  # newest first; history[0] is current


class TaskRollback(BaseModel):
    task: str
    version: str


class TaskDeleted(BaseModel):
    task: str
    deleted: bool


# ---- OpenAPI: what routes document besides their 200 ---------------------------------------------
_ERROR_MEANINGS = {
    400: "The request is invalid: the message names the field and what was expected",
    401: "A missing or unknown API key",
    403: "This key may not do this: the admin key only manages tenants, tenant keys never do",
    404: "No such task, job or tenant for this caller",
    409: "It already exists",
    413: "The upload is larger than the server's limit",
    429: "Over one of the tenant's limits; retry after the Retry-After header's seconds",
    501: "This server is not configured for it (e.g. training without a job queue)",
    503: "Overloaded (retry after the Retry-After header's seconds), the engine stopped, or the adapter "
         "store is unreachable",
    504: "The request ran past the server's time limit and was stopped",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the error statuses it can answer, every one in the `ErrorResponse` shape."""
    return {code: {"model": ErrorResponse, "description": _ERROR_MEANINGS[code]} for code in status_codes}


def event_stream_response(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for its 200 as Server-Sent Events (`"stream": true`), besides the JSON
    answer. Each event's data is a chunk, an error that came after the 200 went out, or `[DONE]`;
    `itemSchema` describes one event, as FastAPI's own event streams (and OpenAPI 3.2) do."""
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": {"anyOf": [_inlined_schema(chunk), _inlined_schema(ErrorResponse)]}}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"description": 'The answer; with "stream": true, Server-Sent Events',
                  "content": {"text/event-stream": {"itemSchema": event}}}}


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's response schema with its `$defs` put in place: OpenAPI resolves `#/...` against
    the whole document, so a schema outside `components` cannot keep `#/$defs/...` references."""
    schema = model.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)
