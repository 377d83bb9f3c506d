"""Schemas of the OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`),
with the vLLM extensions benchmark tools send. Pydantic only: imports nothing heavy.

Unknown request fields are accepted and ignored, because OpenAI clients add fields over time. Known
fields whose silent omission would change the answer (n > 1, echo, best_of, penalties, logit_bias,
top alternatives, structured outputs, tools) are refused with a 400 that says what we support.
Numbers and booleans are strict ("5" for max_tokens is a 400; a float field still takes 0 or 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from prefixserve.server.protocol import NON_NEGATIVE, SEED, STOP, STOP_TOKEN_IDS, TOP_P, accepts


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. `None` means "the default", as OpenAI clients send nulls."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # the task id; None / "base" / the backbone's name: the plain backbone
    temperature: StrictFloat | None = Field(None, json_schema_extra=NON_NEGATIVE)  # None: 1.0, OpenAI's default
    top_p: StrictFloat | None = Field(None, json_schema_extra=TOP_P)
    n: StrictInt | None = Field(None, json_schema_extra=accepts(integer={"const": 1}))
    stop: str | list[str] | None = Field(None, json_schema_extra=STOP)
    seed: StrictInt | None = Field(None, json_schema_extra=SEED)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; tenants come from the API key, not from here
    presence_penalty: StrictFloat | None = Field(None, json_schema_extra=accepts(number={"const": 0}))
    frequency_penalty: StrictFloat | None = Field(None, json_schema_extra=accepts(number={"const": 0}))
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=accepts(object={"maxProperties": 0}))
    # vLLM extensions (sent by benchmark tools such as vllm bench / genai-perf)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_tokens: StrictInt | None = Field(None, ge=0)
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[StrictInt] | None = Field(None, json_schema_extra=STOP_TOKEN_IDS)
    response_format: dict[str, object] | None = Field(None, json_schema_extra=accepts(
        object={"properties": {"type": {"const": "text"}}, "required": ["type"]}))

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError(f"expected n=1 (this server returns one choice per request), found n={n}")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value:
            raise ValueError(f"penalties are not supported; expected 0 or null, found {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias):
        if bias:
            raise ValueError(f"logit_bias is not supported; expected {{}} or null, found {len(bias)} entries")
        return bias

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format):
        if response_format is not None and response_format.get("type") != "text":
            raise ValueError(f"structured outputs are not supported yet; expected response_format "
                             f"{{\"type\": \"text\"}} or null, found type {response_format.get('type')!r:.80}")
        return response_format

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    # text or token ids; a list of one string is unwrapped below
    prompt: str | list[StrictInt] = Field(json_schema_extra=accepts(
        string={"minLength": 1}, array={"minItems": 1, "items": {"type": "integer", "minimum": 0}}))
    max_tokens: StrictInt | None = Field(16, ge=1)  # null: until the context ends or EOS (as vLLM)
    logprobs: StrictInt | None = Field(None, ge=0)  # any value: the chosen tokens' logprobs (no alternatives)
    echo: StrictBool | None = Field(False, json_schema_extra=accepts(boolean={"const": False}))
    best_of: StrictInt | None = Field(None, json_schema_extra=accepts(integer={"const": 1}))
    suffix: str | None = Field(None, json_schema_extra=accepts(string={"maxLength": 0}))

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        # Batches of prompts are what n>1 is to choices: one request, one prompt, one choice.
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"expected one prompt (a string, a list of one string, or a list of token "
                                 f"ids), found a list of {len(prompt)} strings")
            return prompt[0]
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("expected one prompt (a string, a list of one string, or a list of token ids), "
                             f"found a list of {', '.join(sorted({type(p).__name__ for p in prompt}))}")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported; expected false")
        return echo

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of):
        if best_of not in (None, 1):
            raise ValueError(f"expected best_of=1 or null (one candidate per request), found {best_of}")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (insertion) is not supported; expected null")
        return suffix


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
    top_logprobs: StrictInt | None = Field(None, json_schema_extra=accepts(integer={"const": 0}))
    tools: list[dict[str, object]] | None = Field(None, json_schema_extra=accepts(array={"maxItems": 0}))

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools):
        if tools:
            raise ValueError(f"tools are not supported (no function calling here); expected [] or null, "
                             f"found {len(tools)} tools")
        return tools

    @field_validator("top_logprobs")
    @classmethod
    def _chosen_only(cls, top_logprobs):
        if top_logprobs:
            raise ValueError(f"only the chosen tokens' logprobs are available; expected top_logprobs 0 or null, "
                             f"found {top_logprobs}")
        return top_logprobs

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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # the chosen token only: alternatives are not computed
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


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict] = Field(default_factory=list)


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
