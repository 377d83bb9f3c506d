"""A request's state. One counter model (as in vLLM v1): `num_computed_tokens` catches up to
`num_tokens`, so chunked prefill, recompute after preemption and decode are one code path."""

from __future__ import annotations

import enum
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prefixserve.engine.structured import StructuredOutput
from prefixserve.errors import InvalidRequestError, expect

if TYPE_CHECKING:
    from prefixserve.engine.adapter_handle import AdapterHandle
    from prefixserve.engine.detokenizer import IncrementalDetokenizer
    from prefixserve.engine.structured import GrammarMatcher


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5  # could not be served (e.g. its adapter failed to load); the output carries the error

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
# Neither OpenAI nor vLLM documents a length limit for a stop string; ours bounds the text a stream
# holds back and the per-token matching work. A stop phrase longer than this is a prompt, not a stop.
MAX_STOP_CHARS = 512
MAX_CHOICES = 16  # n: choices share the prompt's pages, but each decodes on its own
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs and vLLM's max_logprobs
MAX_LOGIT_BIAS = 1024  # entries; each bias is within +-100, as OpenAI clamps it
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI documents
MAX_REPETITION_PENALTY = 100.0

# One position's alternatives: (token id, log-probability), most likely first.
TopLogprobs = list[tuple[int, float]]


def check_unicode_text(text: str, what: str) -> None:
    """Refuse text that is not Unicode: a JSON body may escape half of a UTF-16 surrogate pair
    ("\\ud800"), which Python keeps as a lone surrogate that no tokenizer or encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"expected {what} to be Unicode text, found a lone surrogate "
                                  f"U+{ord(text[e.start]):04X} at character {e.start} (half of a UTF-16 pair; "
                                  f"send the whole pair or the character itself)") from None


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = 16  # None: until the context (or the KV pool) ends, as OpenAI's null
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens exist
    logprobs: bool = False  # report the log-probability of each chosen token
    top_logprobs: int = 0  # and the k most likely tokens at each position (with logprobs)
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and k alternatives (echo)
    n: int = 1  # choices: each samples its own tokens after one shared prefill of the prompt
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: logits of prompt and output tokens divided (if > 0) or multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    structured: StructuredOutput | None = None  # the output must match this grammar

    def __post_init__(self):
        expect(self.max_new_tokens is None or (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0),
               InvalidRequestError, f"max_new_tokens must be a positive integer, found {self.max_new_tokens!r}")
        expect(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and self.temperature >= 0, InvalidRequestError,
               f"temperature must be a finite number >= 0, found {self.temperature!r}")
        expect(isinstance(self.top_k, int) and self.top_k >= -1, InvalidRequestError,
               f"top_k must be -1, 0 (off) or a positive integer, found {self.top_k!r}")
        expect(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, InvalidRequestError,
               f"top_p must be in (0, 1], found {self.top_p!r}")
        expect(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), InvalidRequestError,
               f"seed must be an integer in [0, 2**63), found {self.seed!r}")
        expect(all(isinstance(s, str) and s for s in self.stop), InvalidRequestError,
               f"stop must be non-empty strings, found {self.stop!r:.200}")
        expect(len(self.stop) <= MAX_STOP_STRINGS, InvalidRequestError,
               f"at most {MAX_STOP_STRINGS} stop strings, found {len(self.stop)}")
        for i, stop in enumerate(self.stop):
            expect(len(stop) <= MAX_STOP_CHARS, InvalidRequestError,
                   f"expected stop strings of at most {MAX_STOP_CHARS} characters, found one of {len(stop)} "
                   f"(stop[{i}])")
            check_unicode_text(stop, f"stop[{i}]")
        expect(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), InvalidRequestError,
               f"stop_token_ids must be non-negative integers, found {self.stop_token_ids!r}")
        expect(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= (self.max_new_tokens or self.min_tokens),
               InvalidRequestError,
               f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], found {self.min_tokens!r}")
        self._check_logprobs_and_choices()
        self._check_logit_processing()

    def _check_logprobs_and_choices(self) -> None:
        expect(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               InvalidRequestError, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
               f"found {self.top_logprobs!r}")
        expect(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               InvalidRequestError, f"prompt_logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}], "
               f"found {self.prompt_logprobs!r}")
        expect(isinstance(self.n, int) and 1 <= self.n <= MAX_CHOICES, InvalidRequestError,
               f"n must be an integer in [1, {MAX_CHOICES}], found {self.n!r}")

    def _check_logit_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            expect(isinstance(value, (int, float)) and -MAX_PENALTY <= value <= MAX_PENALTY, InvalidRequestError,
                   f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], found {value!r}")
        expect(isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty
               <= MAX_REPETITION_PENALTY, InvalidRequestError,
               f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
               f"found {self.repetition_penalty!r}")
        expect(len(self.logit_bias) <= MAX_LOGIT_BIAS, InvalidRequestError,
               f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, found {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            expect(isinstance(token, int) and token >= 0, InvalidRequestError,
                   f"logit_bias keys must be token ids >= 0, found {token!r}")
            expect(isinstance(bias, (int, float)) and -100 <= bias <= 100, InvalidRequestError,
                   f"logit_bias values must be numbers in [-100, 100], found {bias!r} for token {token}")
        if self.structured is not None:
            # A grammar decides when EOS may come; forcing text past its end has no valid token to offer.
            expect(not self.ignore_eos and self.min_tokens == 0, InvalidRequestError,
                   "structured outputs end where the grammar does: expected ignore_eos false and min_tokens 0 "
                   f"with a response format, found ignore_eos={self.ignore_eos}, min_tokens={self.min_tokens}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # Below ~1e-5, logits / temperature overflows fp32 and sampling is argmax anyway (as in vLLM).
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


def check_context_room(num_prompt_tokens: int, prefix_len: int, max_new_tokens: int | None, max_model_len: int) -> None:
    """The prompt after the task's virtual tokens must leave room for one new token, and for all the
    new tokens asked for (None: as many as fit). Refused with both numbers rather than clamped, as vLLM."""
    task_part = f" after the task's {prefix_len} virtual tokens" if prefix_len else ""
    room = max_model_len - prefix_len - num_prompt_tokens
    if room < 1:
        raise InvalidRequestError(f"the prompt has {num_prompt_tokens} tokens{task_part} but the context holds "
                                  f"{max_model_len} (prompt plus at least one new token)")
    if max_new_tokens is not None and max_new_tokens > room:
        task_term = f" - {prefix_len}" if prefix_len else ""
        raise InvalidRequestError(f"max_new_tokens (max_tokens in the OpenAI API) is too large: {max_new_tokens}. "
                                  f"The context holds {max_model_len} tokens and the request has {num_prompt_tokens} "
                                  f"prompt tokens{task_part}, leaving room for at most {room} new tokens "
                                  f"({max_new_tokens} > {max_model_len} - {num_prompt_tokens}{task_term})")


@dataclass
class RequestOutput:
    """What one step produced for one request: deltas since the previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    new_logprobs: list[float] | None = None
    error: Exception | None = None  # set with finish_reason "error"
    queue_time_s: float | None = None  # on the first token's output: arrival -> first scheduled
    new_top_logprobs: list[TopLogprobs] | None = None  # per new token, when top_logprobs > 0
    # On a choice's first token when prompt_logprobs is set: one entry per prompt token, None for
    # the first (nothing predicts it); alternatives likewise.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs (what they are of)
    index: int = 0  # the choice (n > 1); `finished` is for the whole request, `choice_finished` for this choice
    choice_finished: bool = False


@dataclass(eq=False)
class RequestGroup:
    """The choices of one request (n > 1): they exist once the prompt is prefilled, share its pages,
    and the request is finished when every choice is."""

    n: int
    members: list[Request] = field(default_factory=list)  # unfinished choices
    forked: bool = False

    @property
    def finished(self) -> bool:
        return self.forked and not self.members


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = "default"
    tenant_weight: float = 1.0  # the tenant's share of the engine relative to others (fair scheduling)
    task: str | None = None  # None = the plain backbone
    task_version: str | None = None  # the adapter version pinned at arrival
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # set by the scheduler on first admission
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | int | None = None
    adapter: AdapterHandle | None = None  # the task version pinned at admission, held to the end
    detokenizer: IncrementalDetokenizer | None = None  # None when the backbone has no tokenizer
    num_emitted_chars: int = 0  # text already streamed (stop-string hold-back keeps it behind)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # prompt_logprobs[i] is for prompt token i + 1; shared by a request's choices (computed once)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    grammar: GrammarMatcher | None = None  # structured outputs: where the output is in its grammar
    index: int = 0  # which choice this is (n > 1)
    output_id: str | None = None  # the id outputs carry (the request's, for every choice); None: request_id
    group: RequestGroup | None = None  # n > 1

    def __post_init__(self):
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)  # prompt + output, appended in place
        if self.output_id is None:
            self.output_id = self.request_id
        if self.params.n > 1 and self.group is None:
            self.group = RequestGroup(self.params.n, [self])
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        if self.params.seed is not None:
            seed = (seed + self.index) % 2**63  # each choice its own stream, reproducible (as vLLM)
        # A private generator per request keeps seeded sampling independent of the batch around it.
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def adapter_pending(self) -> bool:
        """Waiting for its adapter version to reach the device; the scheduler passes over it."""
        return self.task_version is not None and self.adapter is None

    @property
    def prompt_logprobs_pending(self) -> int:
        """Prompt positions whose next token's logprob is still to compute (0 when not asked for)."""
        if self.params.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - 1 - len(self.prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
