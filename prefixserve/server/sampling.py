"""Request bodies of both APIs to the engine's SamplingParams: OpenAI's defaults for what a client
left out or sent as null, logit_bias clamped as OpenAI does, and the structured output asked for.
SamplingParams checks the ranges (a 400 that names the field)."""

from __future__ import annotations

import json

from prefixserve.engine.request import SamplingParams, check_unicode_text
from prefixserve.engine.structured import StructuredOutput
from prefixserve.errors import InvalidRequestError
from prefixserve.server.protocol import SteeringFields

LOGIT_BIAS_LIMIT = 100.0


def steering_params(body: SteeringFields) -> dict:
    """SamplingParams keyword arguments for the penalties, logit_bias and structured output of `body`."""
    bias = tuple((int(token), max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, value)))
                 for token, value in (body.logit_bias or {}).items())
    return {
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "logit_bias": bias,
        "structured": structured_output(body),
    }


def structured_output(body: SteeringFields) -> StructuredOutput | None:
    """The one structured output option `body` sets (the protocol refuses more than one), if any."""
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        return StructuredOutput("json_object")
    if response_format is not None and response_format.type == "json_schema":
        return StructuredOutput("json_schema", _schema_text(response_format.json_schema.json_schema))
    if body.guided_json is not None:
        return StructuredOutput("json_schema", _schema_text(body.guided_json))
    if body.guided_regex is not None:
        check_unicode_text(body.guided_regex, "guided_regex")
        return StructuredOutput("regex", body.guided_regex)
    if body.guided_choice is not None:
        for i, choice in enumerate(body.guided_choice):
            check_unicode_text(choice, f"guided_choice[{i}]")
        return StructuredOutput("choice", json.dumps(body.guided_choice))
    if body.guided_grammar is not None:
        check_unicode_text(body.guided_grammar, "guided_grammar")
        return StructuredOutput("grammar", body.guided_grammar)
    return None


def _schema_text(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"expected guided_json to be a JSON schema (an object or its JSON text), "
                                      f"found text that is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"expected a JSON schema object, found {type(schema).__name__}")
    # Compact text, so equal schemas share one compiled grammar in the engine's cache. Keys keep the
    # client's order: llguidance emits properties in schema order, as OpenAI does.
    return json.dumps(schema, separators=(",", ":"))


def sampling_params(body, max_new_tokens: int | None, *, logprobs: bool = False, top_logprobs: int = 0,
                    prompt_logprobs: int | None = None, n: int = 1) -> SamplingParams:
    """Both APIs' shared fields (temperature, top_p, top_k, seed, stop, ...) plus the steering ones."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0, seed=body.seed, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos), min_tokens=body.min_tokens or 0, logprobs=logprobs,
        top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, n=n, **steering_params(body),
    )
