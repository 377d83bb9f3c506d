"""Request and response schemas of the HTTP API (pydantic; imports nothing heavy, so the SDK can share them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = None  # None / "base": the plain backbone (adapters arrive with the tasks API)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_new_tokens: int = Field(16, description="tokens to generate, > 0")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    stream: bool = False

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


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
