"""Schemas of the OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`),
with the vLLM extensions benchmark tools and evaluation harnesses send. Pydantic only: imports nothing heavy.

Every field of OpenAI's request types is either honoured, or refused with a 400 that says what we
support when set to something we would otherwise silently ignore (tools, audio, suffix), or listed in
`IGNORED_FIELDS` with why ignoring it changes no answer. Fields OpenAI does not know are accepted and
ignored, because clients add fields over time. Numbers and booleans are strict ("5" for max_tokens is a
400; a float field still takes 0 or 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from prefixserve.server.protocol import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    NON_NEGATIVE,
    SEED,
    STOP,
    STOP_TOKEN_IDS,
    TOP_P,
    SteeringFields,
    accepts,
)

MAX_PROMPTS = 32  # prompts in one /v1/completions request (each is its own engine request)

# Fields of OpenAI's request types that are accepted and have no effect here, and why that is honest.
IGNORED_FIELDS = {
    "user": "end-user id for abuse monitoring; the tenant comes from the API key",
    "safety_identifier": "end-user id for abuse monitoring, as user",
    "store": "OpenAI stores completions for its dashboards; nothing is stored here",
    "metadata": "tags for OpenAI's stored completions",
    "service_tier": "OpenAI's capacity tiers; tenants' shares are set by the operator",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache",
    "prompt_cache_retention": "how long OpenAI keeps a prompt cache",
    "prompt_cache_options": "breakpoints and lifetime of OpenAI's prompt cache",
    "parallel_tool_calls": "meaningless without tools, which are refused",
    "prediction": "predicted outputs only speed decoding up on OpenAI; the answer is the same without",
    "reasoning_effort": "for reasoning models; the backbones served here do not reason",
    "verbosity": "for reasoning models, as reasoning_effort",
    "stream_options.include_obfuscation": "padding against side channels on OpenAI's streams",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: usage in every chunk (guidellm asks for it)


class SamplingFields(SteeringFields):
    """The fields both endpoints share. `None` means "the default", as OpenAI clients send nulls."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # the task id; None / "base" / the backbone's name: the plain backbone
    temperature: StrictFloat | None = Field(None, json_schema_extra=NON_NEGATIVE)  # None: 1.0, OpenAI's default
    top_p: StrictFloat | None = Field(None, json_schema_extra=TOP_P)
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)  # choices share one prefill of the prompt
    stop: str | list[str] | None = Field(None, json_schema_extra=STOP)
    seed: StrictInt | None = Field(None, json_schema_extra=SEED)  # choice i draws with seed + i
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions (sent by benchmark tools such as vllm bench / genai-perf)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_tokens: StrictInt | None = Field(None, ge=0)
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[StrictInt] | None = Field(None, json_schema_extra=STOP_TOKEN_IDS)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    # one prompt (text or token ids) or a batch of them (texts or token-id lists): one choice set each
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(json_schema_extra=accepts(
        string={"minLength": 1}, array={"minItems": 1, "maxItems": MAX_PROMPTS}))
    max_tokens: StrictInt | None = Field(16, ge=1)  # null: until the context ends or EOS (as vLLM)
    # k: the chosen tokens' logprobs and the k most likely tokens at each position (the chosen one too)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool | None = False  # the prompt before the completion (with its logprobs if asked)
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)  # the n best of best_of by mean logprob
    suffix: str | None = Field(None, json_schema_extra=accepts(string={"maxLength": 0}))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("expected a prompt, found an empty list")
            kinds = {type(p).__name__ for p in prompt}
            if len(kinds) > 1:
                raise ValueError(f"expected one prompt (a string or a list of token ids) or a batch of prompts of "
                                 f"one kind, found a list mixing {', '.join(sorted(kinds))}")
            batch = isinstance(prompt[0], (str, list))
            if batch and len(prompt) > MAX_PROMPTS:
                raise ValueError(f"expected at most {MAX_PROMPTS} prompts in one request, found {len(prompt)}")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (insertion) is not supported; expected null")
        return suffix

    @model_validator(mode="after")
    def _best_of(self):
        n = self.n or 1
        best_of = self.best_of or n
        if best_of < n:
            raise ValueError(f"expected best_of >= n, found best_of={best_of}, n={n}")
        if best_of > n and self.stream:
            raise ValueError(f"best_of={best_of} > n={n} cannot stream (the best are known only at the end); "
                             f"expected stream false")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        return self.prompt if isinstance(self.prompt[0], (str, list)) else [self.prompt]


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(json_schema_extra=accepts(string={"const": "text"}))  # no images or audio here
    text: str | None = None


class OpenAIChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatContentPart] | None = None

    def text(self) -> str:
        """The message as plain text: content parts must all be text (no images or audio here)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = sorted({p.type for p in self.content if p.type != "text"})
        if kinds:
            raise ValueError(f"expected text content parts only, found {', '.join(kinds)}")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # null: until the context ends or EOS
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs, as OpenAI
    tools: list[dict[str, object]] | None = Field(None, json_schema_extra=accepts(array={"maxItems": 0}))
    tool_choice: str | dict[str, object] | None = Field(None, json_schema_extra=accepts(
        string={"enum": ["none", "auto"]}))
    functions: list[dict[str, object]] | None = Field(None, json_schema_extra=accepts(array={"maxItems": 0}))
    function_call: str | dict[str, object] | None = Field(None, json_schema_extra=accepts(
        string={"enum": ["none", "auto"]}))
    modalities: list[str] | None = Field(None, json_schema_extra=accepts(array={"items": {"const": "text"}}))
    audio: dict[str, object] | None = Field(None, json_schema_extra=accepts(object={"maxProperties": 0}))
    web_search_options: dict[str, object] | None = Field(None, json_schema_extra=accepts(
        object={"maxProperties": 0}))
    # A moderation model screening input and output would change (block) answers: none runs here.
    moderation: dict[str, object] | None = Field(None, json_schema_extra=accepts(object={"maxProperties": 0}))

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, tools, info):
        if tools:
            raise ValueError(f"{info.field_name} are not supported (no function calling here); expected [] or "
                             f"null, found {len(tools)}")
        return tools

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, choice, info):
        if choice is not None and choice not in ("none", "auto"):
            raise ValueError(f"{info.field_name} can only be \"none\" or \"auto\" here (no tools are served), "
                             f"found {str(choice):.80}")
        return choice

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, modalities):
        if modalities and set(modalities) != {"text"}:
            raise ValueError(f"only text output is served; expected modalities [\"text\"], found {modalities}")
        return modalities

    @field_validator("audio", "web_search_options", "moderation")
    @classmethod
    def _not_served(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported here (text generation only); expected null")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs true, as in OpenAI's API")
        return self

    @field_validator("messages")
    @classmethod
    def _texts(cls, messages):
        for message in messages:
            message.text()  # refuse non-text parts at validation time, as a 400
        return messages

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (echo): nothing predicts it
    top_logprobs: list[dict[str, float] | None]  # the k most likely and the chosen token, per position
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole answer and a stream chunk: OpenAI uses "text_completion" for either."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefixserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
