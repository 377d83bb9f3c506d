"""Structured outputs: OpenAI's `response_format` (json_object, json_schema) and vLLM's guided_regex,
guided_choice and guided_grammar, as per-row token masks inside a mixed batch (llguidance).

A spec is compiled once, at admission, on the caller's thread (`GrammarCompiler.compile`, LRU-cached);
each request then owns a `GrammarMatcher` (its position in the grammar), and one engine step masks
every constrained row with one parallel llguidance call (`apply_grammar_masks`)."""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache

import llguidance
import llguidance.hf
import numpy as np
import torch

from prefixserve.errors import ConfigError, InvalidRequestError, PrefixServeError, expect

# Not llguidance.torch: importing it compiles its mask kernel with torch.compile (seconds at import,
# and a C compiler on CPU); the few tensor ops it wraps are written out below instead.

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64 * 1024  # the protocol's MAX_GRAMMAR_CHARS: bounds compile work before any starts
MAX_REASON_CHARS = 300  # of llguidance's message, enough for its "at line(col): what" and a caret

# Compact JSON in json.dumps' default style, which chat models write anyway. llguidance's default
# (any whitespace between tokens) lets a small model loop on newlines until max_tokens; a schema's
# own "x-guidance" options still override these (llguidance applies defaults, then x-guidance).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# llguidance's defaults bound each mask step (step_lexer_fuel ~14 ms, step_max_items ~2.5 ms) and the
# initial lexer (~20 ms of fuel). We lower the lexer-state cap (1-2 kB each; the default 250k is up to
# ~500 MB for one grammar on a shared server) and keep the grammar text out of error messages, which
# reach HTTP responses and logs. A grammar that hits a limit errors out instead of stalling: at
# compile time a 400 here; mid-generation (e.g. max_items_in_row, 2000, on a schema with ~1000 optional
# properties) the matcher's mask allows only EOS and `accept` raises with llguidance's reason.
PARSER_LIMITS = llguidance.LLParserLimits(max_lexer_states=50_000, verbose_errors=False)


@dataclass(frozen=True)
class StructuredOutput:
    """What a request asks its output to match. Hashable (it lives in the frozen SamplingParams).

    json_schema: the schema as JSON text. OpenAI's `strict` true or false are served alike: llguidance
    always enforces the schema; where it leaves `additionalProperties` out, JSON Schema's default
    (extra keys allowed) holds, so strict clients send `"additionalProperties": false` as OpenAI requires.
    regex: a full-match pattern (Rust regex syntax: no look-around or backreferences).
    choice: a JSON list of strings; the output is exactly one of them.
    grammar: a Lark grammar in llguidance's dialect. json_object: any JSON object, spec "".
    """

    kind: str
    spec: str = ""

    def __post_init__(self):
        expect(self.kind in KINDS, InvalidRequestError,
               f"expected a structured output kind in {', '.join(KINDS)}, found {self.kind!r}")
        expect(isinstance(self.spec, str), InvalidRequestError,
               f"expected the {self.kind} spec as text, found {type(self.spec).__name__}")
        expect(len(self.spec) <= MAX_SPEC_CHARS, InvalidRequestError,
               f"expected a {self.kind} spec of at most {MAX_SPEC_CHARS} characters, found {len(self.spec)}")
        if self.kind == "json_object":
            expect(self.spec == "", InvalidRequestError,
                   f"expected no spec for json_object (any JSON object), found {len(self.spec)} characters")
        elif self.kind == "json_schema":
            expect(isinstance(self._parsed(), dict), InvalidRequestError,
                   f"expected the json_schema spec to be a JSON object, found {type(self._parsed()).__name__}")
        elif self.kind == "choice":
            choices = self._parsed()
            expect(isinstance(choices, list) and len(choices) > 0 and all(isinstance(c, str) for c in choices),
                   InvalidRequestError, f"expected the choice spec to be a non-empty JSON list of strings, "
                   f"found {self.spec[:80]!r}")
        else:
            expect(self.spec != "", InvalidRequestError, f"expected a {self.kind} spec, found an empty one")

    def _parsed(self):
        try:
            return json.loads(self.spec)
        except ValueError as exc:
            raise InvalidRequestError(f"expected the {self.kind} spec to be JSON text, found text that is not "
                                      f"JSON: {exc}") from None


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A spec compiled against one tokenizer: a matcher in its start state whose lexer is already
    warmed by one mask, so each request's deep copy (~1 us) starts fast."""

    spec: StructuredOutput
    vocab_size: int
    _prototype: llguidance.LLMatcher


class GrammarMatcher:
    """One request's position in its grammar (engine thread only)."""

    def __init__(self, matcher: llguidance.LLMatcher, kind: str, vocab_size: int):
        self._matcher = matcher
        self.kind = kind
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> None:
        """Advance by one sampled token; a token the grammar refuses raises InvalidRequestError (it
        cannot happen once the mask was applied, unless a limit stopped the grammar mid-generation)."""
        try:
            consumed = self._matcher.consume_token(token_id)
        except OverflowError:  # a negative or huge id; llguidance answers False for ids past the vocab
            consumed = False
        if not consumed:
            reason = self._matcher.get_error()[:MAX_REASON_CHARS] or "not a token id"
            raise InvalidRequestError(f"expected a token that the {self.kind} output format allows, "
                                      f"found token {token_id}: {reason}")

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS, which the engine need not wait for)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def copy(self) -> GrammarMatcher:
        """Independent state (n>1 choices fork after the prompt)."""
        return GrammarMatcher(self._matcher.deep_copy(), self.kind, self.vocab_size)


class GrammarCompiler:
    """Compiles specs against one model's tokenizer, with an LRU of `max_cached` compiled grammars.
    Thread-safe: compile runs on worker threads, concurrently (llguidance drops the GIL)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int], max_cached: int = 256):
        """tokenizer: a transformers PreTrainedTokenizerFast. vocab_size: the model's (the logits' width);
        tokens past the tokenizer's own length are always masked out."""
        expect(max_cached >= 1, ConfigError, f"expected max_cached >= 1, found {max_cached}")
        expect(len(eos_token_ids) > 0, ConfigError, "expected at least one EOS token id, found none")
        try:
            # The EOS ids are the model's, so an accepting grammar's mask allows exactly the tokens
            # on which the engine's normal EOS stop fires. Reads the whole vocabulary: ~0.5 s.
            self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                           eos_token=sorted(eos_token_ids))
        except ValueError as exc:  # e.g. vocab_size below the tokenizer's length, or a slow tokenizer
            raise ConfigError(f"expected a fast tokenizer of at most {vocab_size} tokens: {exc}") from None
        self.vocab_size = vocab_size
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._in_flight: dict[StructuredOutput, Future] = {}

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar for `spec`, from the cache if there; a spec llguidance cannot compile
        raises InvalidRequestError (at admission, never in the engine step)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            pending = self._in_flight.get(spec)
            if pending is None:  # this thread compiles; identical specs arriving meanwhile wait for it
                pending = self._in_flight[spec] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            try:
                return pending.result()
            except InvalidRequestError as exc:  # a fresh error per waiter: one instance raised in many threads
                raise InvalidRequestError(exc.message) from None
        try:
            compiled = self._compile_uncached(spec)
        except BaseException as exc:
            with self._lock:
                del self._in_flight[spec]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._in_flight[spec]
            self._cache[spec] = compiled
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        pending.set_result(compiled)
        return compiled

    def matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher at the start of `compiled` (one per request)."""
        expect(compiled.vocab_size == self.vocab_size, PrefixServeError,
               f"expected a grammar compiled for vocab {self.vocab_size}, found one for {compiled.vocab_size}")
        return GrammarMatcher(compiled._prototype.deep_copy(), compiled.spec.kind, self.vocab_size)

    @property
    def num_cached(self) -> int:
        """How many compiled grammars the cache holds."""
        with self._lock:
            return len(self._cache)

    def _compile_uncached(self, spec: StructuredOutput) -> CompiledGrammar:
        try:
            prototype = llguidance.LLMatcher(self._tokenizer, _grammar(spec), log_level=0, limits=PARSER_LIMITS)
            if not prototype.is_error():
                # The first mask builds the lexer (up to tens of ms for a large schema): pay it here, on
                # the worker thread, where a grammar that hits a limit still becomes a 400.
                prototype.compute_bitmask()
        except (ValueError, RuntimeError) as exc:  # llguidance raises for API misuse; say what it said
            raise InvalidRequestError(f"the {spec.kind} output format cannot be compiled: "
                                      f"{str(exc)[:MAX_REASON_CHARS]}") from None
        if prototype.is_error():
            raise InvalidRequestError(f"the {spec.kind} output format cannot be compiled: "
                                      f"{prototype.get_error()[:MAX_REASON_CHARS]}")
        return CompiledGrammar(spec, self.vocab_size, prototype)


def _grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar text for a spec (nothing is checked until the LLMatcher is built)."""
    if spec.kind == "json_object":
        # No properties, so JSON Schema's additionalProperties default admits any keys and values.
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        # JSON string literals are Lark string literals to llguidance (quotes, backslashes, \n, \uXXXX).
        choices = json.loads(spec.spec)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return llguidance.LLMatcher.grammar_from_lark(spec.spec)


_executor_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None


def _mask_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool (80% of the CPUs, at most 32), made on first use."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


@lru_cache(maxsize=8)
def _bit_values(device: torch.device) -> torch.Tensor:
    # [32] int32: 1 << b for each bit of a mask word (bit 31 wraps to the sign bit, as in the mask)
    return torch.ones(32, dtype=torch.int32, device=device) << torch.arange(32, dtype=torch.int32, device=device)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[GrammarMatcher | None]) -> torch.Tensor:
    """logits: [N, vocab] fp32, row i for matchers[i]. Returns a NEW tensor where, in rows whose matcher
    is not None, every token the grammar forbids is -inf; `logits` is never modified (the runner's rows
    may be read again, e.g. a per-row retry or the raw log-probabilities). Rows with None keep their
    values bit for bit. If every matcher is None, returns `logits` itself and allocates nothing."""
    num_rows, vocab_size = logits.shape
    expect(len(matchers) == num_rows, PrefixServeError,
           f"expected one matcher per logits row ({num_rows}), found {len(matchers)}")
    constrained = [(m._matcher, i) for i, m in enumerate(matchers) if m is not None]
    if not constrained:
        return logits
    widths = {m.vocab_size for m in matchers if m is not None}
    expect(widths == {vocab_size}, PrefixServeError,
           f"expected grammars compiled for the logits' vocab {vocab_size}, found {sorted(widths)}")
    num_words = (vocab_size + 31) // 32
    # bitmask: [N, num_words] int32, bit b of word w allows token 32*w + b; -1 (all allowed) in the
    # unconstrained rows, so they come out bit for bit. Pinned when the logits are on a GPU: the host
    # allocator caches pinned blocks and reuses one only after its copy completes, so the non-blocking
    # copy in _allowed is safe.
    bitmask = torch.full((num_rows, num_words), -1, dtype=torch.int32, pin_memory=logits.is_cuda)
    # All constrained rows in one call, on llguidance's threads, without the GIL.
    _mask_executor().unsafe_compute_mask_ptr(constrained, bitmask.data_ptr(), num_words * 4, num_rows)
    return torch.where(_allowed(bitmask, vocab_size, logits.device), logits, float("-inf"))


def _allowed(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bitmask: [N, num_words] int32 on the host. Returns [N, vocab] bool on `device`: True = allowed."""
    if device.type == "cpu" and sys.byteorder == "little":
        return _unpack_on_host(bitmask, vocab_size)
    # Copy the packed words (32x smaller than the bools) and unpack on the device.
    return _unpack(bitmask.to(device, non_blocking=True), vocab_size)


def _unpack_on_host(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # numpy unpacks in one C pass (the tensor ops in _unpack take several over N x vocab). On a
    # little-endian host byte 0 of a word holds its bits 0-7, so the words read as bytes in order.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))  # [N, vocab], bytes of 0/1 read as bools


def _unpack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    allowed = (words.unsqueeze(-1) & _bit_values(words.device)) != 0  # [N, num_words, 32]
    return allowed.view(words.shape[0], -1)[:, :vocab_size]  # [N, vocab]
