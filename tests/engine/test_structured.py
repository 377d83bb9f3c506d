"""Structured outputs: spec validation, compile errors as 400s, per-row masks in a mixed batch, and
greedy decoding over random logits that always yields text matching the spec."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import llguidance
import pytest
import torch

from prefixserve.engine import structured
from prefixserve.engine.structured import (
    MAX_SPEC_CHARS,
    GrammarCompiler,
    StructuredOutput,
    apply_grammar_masks,
)
from prefixserve.errors import InvalidRequestError

PERSON_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False,
})
PADDING = 37  # model vocab past the tokenizer's length, odd so the last mask word is partly used


# --- spec validation (no tokenizer needed) ---

@pytest.mark.parametrize("kind, spec, message", [
    ("xml", "", "expected a structured output kind in json_object, json_schema, regex, choice, grammar, found 'xml'"),
    ("regex", 123, "expected the regex spec as text, found int"),
    ("regex", "a" * (MAX_SPEC_CHARS + 1), f"at most {MAX_SPEC_CHARS} characters, found {MAX_SPEC_CHARS + 1}"),
    ("json_object", '{"type": "object"}', "expected no spec for json_object"),
    ("json_schema", '{"type": "object"', "expected the json_schema spec to be JSON text, found text that is not JSON"),
    ("json_schema", "[1, 2]", "expected the json_schema spec to be a JSON object, found list"),
    ("choice", '["yes", 1]', "expected the choice spec to be a non-empty JSON list of strings"),
    ("choice", "[]", "expected the choice spec to be a non-empty JSON list of strings"),
    ("grammar", "", "expected a grammar spec, found an empty one"),
])
def test_invalid_specs_are_refused_with_what_was_expected(kind, spec, message):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutput(kind, spec)
    assert message in info.value.message
    assert info.value.status_code == 400


@pytest.mark.parametrize("vocab_size", [32, 45, 1000, 49152 + PADDING])
def test_host_and_device_unpacking_agree_with_the_bit_layout(vocab_size):
    # The GPU path (_unpack) runs here on the CPU; both must read bit b of word w as token 32*w + b.
    num_words = (vocab_size + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, num_words), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(vocab_size))
    token = torch.arange(vocab_size)
    expected = ((bitmask[:, token // 32] >> (token % 32).to(torch.int32)) & 1) == 1  # [3, vocab]
    assert torch.equal(structured._unpack_on_host(bitmask, vocab_size), expected)
    assert torch.equal(structured._unpack(bitmask, vocab_size), expected)


def test_specs_are_hashable_and_equal_by_value():
    assert {StructuredOutput("regex", "a+"), StructuredOutput("regex", "a+")} == {StructuredOutput("regex", "a+")}
    assert StructuredOutput("json_object") != StructuredOutput("json_schema", "{}")


# --- against SmolLM2's tokenizer ---

@pytest.fixture(scope="module")
def compiler(smollm2):
    return GrammarCompiler(smollm2.tokenizer, smollm2.arch.vocab_size, smollm2.eos_token_ids)


@pytest.fixture(scope="module")
def padded_compiler(smollm2):
    # A second EOS (<|endoftext|>, id 0): an accepting grammar must allow exactly the model's EOS ids.
    return GrammarCompiler(smollm2.tokenizer, len(smollm2.tokenizer) + PADDING, smollm2.eos_token_ids | {0})


def allowed_ids(masked_row: torch.Tensor) -> list[int]:
    return torch.isfinite(masked_row).nonzero().flatten().tolist()


def random_logits(rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(seed))


def greedy_text(compiler, smollm2, spec: StructuredOutput, seed: int, max_steps: int = 200) -> str:
    """Greedy over random logits under the mask, as the engine would, until EOS or the grammar ends."""
    matcher = compiler.matcher(compiler.compile(spec))
    generator = torch.Generator().manual_seed(seed)
    token_ids = []
    for _ in range(max_steps):
        logits = torch.randn(1, compiler.vocab_size, generator=generator)  # [1, vocab]
        token = int(apply_grammar_masks(logits, [matcher]).argmax(-1))
        if token in smollm2.eos_token_ids:
            break
        matcher.accept(token)
        token_ids.append(token)
        if matcher.is_terminated:
            break
    else:
        pytest.fail(f"{spec.kind} did not finish in {max_steps} steps: {smollm2.tokenizer.decode(token_ids)!r}")
    return smollm2.tokenizer.decode(token_ids)


@pytest.mark.slow
@pytest.mark.parametrize("kind, spec, reason", [
    ("regex", "[0-9", "unclosed character class"),
    ("regex", "a{2,1}", "invalid repetition count range"),
    ("grammar", 'start: "a" (', "Expected token ')'"),
    ("grammar", 'start: item\nitem: "a"\nitem: "b"', 'duplicate rule: "item"'),
    ("grammar", 'answer: "a"', "no start rule found"),
    ("json_schema", '{"type": "nonsense"}', "nonsense"),
    ("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}', ""),
])
def test_a_spec_llguidance_cannot_compile_is_a_400_naming_kind_and_reason(compiler, kind, spec, reason):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(StructuredOutput(kind, spec))
    assert info.value.message.startswith(f"the {kind} output format cannot be compiled: ")
    assert reason in info.value.message
    assert len(info.value.message) < 400


@pytest.mark.slow
def test_a_grammar_over_the_parser_limits_errors_at_compile(compiler, monkeypatch):
    words = "|".join(f"w{i}x" for i in range(2000))
    spec = StructuredOutput("regex", words)
    monkeypatch.setattr(structured, "PARSER_LIMITS", llguidance.LLParserLimits(initial_lexer_fuel=10_000,
                                                                               verbose_errors=False))
    with pytest.raises(InvalidRequestError, match="regex output format cannot be compiled: .*too big"):
        compiler.compile(spec)
    monkeypatch.undo()
    compiler.compile(spec)  # within the real limits, and the failure was not cached


@pytest.mark.slow
def test_a_digit_regex_allows_only_digits_and_leaves_unconstrained_rows_bitwise_equal(compiler, smollm2):
    digits = compiler.matcher(compiler.compile(StructuredOutput("regex", "[0-9]{3}")))
    letters = compiler.matcher(compiler.compile(StructuredOutput("regex", "[a-z]+")))
    logits = random_logits(4, compiler.vocab_size)  # [4, vocab]
    original = logits.clone()
    masked = apply_grammar_masks(logits, [digits, None, letters, None])

    assert torch.equal(logits, original)  # a new tensor; the runner's logits are never written
    decoded = [smollm2.tokenizer.decode([t]) for t in allowed_ids(masked[0])]
    assert len(decoded) >= 10 and all(re.fullmatch(r"[0-9]+", text) for text in decoded), decoded
    assert set("0123456789") <= set(decoded)
    decoded = [smollm2.tokenizer.decode([t]) for t in allowed_ids(masked[2])]
    assert len(decoded) > 100 and all(re.fullmatch(r"[a-z]+", text) for text in decoded)
    assert torch.equal(masked[[1, 3]], original[[1, 3]])
    finite = torch.isfinite(masked[0])
    assert torch.equal(masked[0][finite], original[0][finite])  # allowed tokens keep their logits


@pytest.mark.slow
def test_no_constrained_row_returns_the_same_tensor(compiler):
    logits = random_logits(3, compiler.vocab_size)
    assert apply_grammar_masks(logits, [None, None, None]) is logits


@pytest.mark.slow
def test_tokens_past_the_tokenizer_are_always_masked(padded_compiler, smollm2):
    vocab_size = len(smollm2.tokenizer)
    anything = padded_compiler.matcher(padded_compiler.compile(StructuredOutput("regex", r"(.|\n)*")))
    logits = random_logits(2, vocab_size + PADDING)  # [2, vocab + 37]
    masked = apply_grammar_masks(logits, [None, anything])
    assert torch.isneginf(masked[1, vocab_size:]).all()
    assert torch.isfinite(masked[1, :vocab_size]).sum() > vocab_size // 2
    assert torch.equal(masked[0], logits[0])


@pytest.mark.slow
def test_a_finished_grammar_allows_exactly_the_models_eos_ids(padded_compiler, smollm2):
    done = padded_compiler.matcher(padded_compiler.compile(StructuredOutput("regex", "ok")))
    for token in smollm2.tokenizer.encode("ok", add_special_tokens=False):
        done.accept(token)
    masked = apply_grammar_masks(random_logits(1, padded_compiler.vocab_size), [done])
    assert done.is_terminated
    assert set(allowed_ids(masked[0])) == smollm2.eos_token_ids | {0}


@pytest.mark.slow
def test_eos_is_allowed_exactly_when_the_grammar_accepts(compiler, smollm2):
    (eos,) = smollm2.eos_token_ids
    digit = {d: smollm2.tokenizer.encode(d, add_special_tokens=False)[0] for d in "0123456789"}
    three = compiler.matcher(compiler.compile(StructuredOutput("regex", "[0-9]{3}")))
    some = compiler.matcher(compiler.compile(StructuredOutput("regex", "[0-9]+")))
    logits = random_logits(2, compiler.vocab_size)
    assert eos not in allowed_ids(apply_grammar_masks(logits, [three, some])[0])
    for matcher in (three, some):
        matcher.accept(digit["4"])
    masked = apply_grammar_masks(logits, [three, some])
    assert eos not in allowed_ids(masked[0]) and eos in allowed_ids(masked[1]) and digit["1"] in allowed_ids(masked[1])
    three.accept(digit["2"])
    three.accept(digit["7"])
    assert three.is_terminated and not some.is_terminated
    assert allowed_ids(apply_grammar_masks(logits[:1], [three])[0]) == [eos]  # the engine's EOS stop fires
    with pytest.raises(InvalidRequestError, match="expected a token that the regex output format allows"):
        some.accept(smollm2.tokenizer.encode("x", add_special_tokens=False)[0])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_json_schema_output_parses_with_exactly_the_schema(compiler, smollm2, seed):
    text = greedy_text(compiler, smollm2, StructuredOutput("json_schema", PERSON_SCHEMA), seed)
    value = json.loads(text)
    assert list(value) == ["name", "age"], text  # additionalProperties false: no other key
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_greedy_choice_output_is_one_of_the_choices(compiler, smollm2, seed):
    assert greedy_text(compiler, smollm2, StructuredOutput("choice", '["yes", "no", "maybe"]'), seed) in {
        "yes", "no", "maybe"}


@pytest.mark.slow
def test_choices_with_quotes_and_backslashes_are_matched_literally(compiler, smollm2):
    choices = ['say "hi"', "back\\slash", "a|b", "/x/"]
    seen = {greedy_text(compiler, smollm2, StructuredOutput("choice", json.dumps(choices)), seed) for seed in range(8)}
    assert seen <= set(choices) and seen


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_regex_output_fullmatches(compiler, smollm2, seed):
    assert re.fullmatch(r"[a-c]{2}-[0-9]", greedy_text(compiler, smollm2, StructuredOutput("regex", "[a-c]{2}-[0-9]"),
                                                       seed))


@pytest.mark.slow
def test_json_object_accepts_any_object_and_refuses_other_json(compiler, smollm2):
    compiled = compiler.compile(StructuredOutput("json_object"))
    good = compiler.matcher(compiled)
    for token in smollm2.tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False):
        good.accept(token)
    assert good.is_terminated
    bad = compiler.matcher(compiled)
    with pytest.raises(InvalidRequestError, match="json_object"):
        bad.accept(smollm2.tokenizer.encode("[", add_special_tokens=False)[0])


@pytest.mark.slow
def test_a_copy_advances_independently(compiler, smollm2):
    def ids(text):
        return smollm2.tokenizer.encode(text, add_special_tokens=False)

    original = compiler.matcher(compiler.compile(StructuredOutput("regex", "[a-c]{2}-[0-9]")))
    original.accept(ids("a")[0])
    fork = original.copy()
    for token in ids("b-"):
        fork.accept(token)
    logits = random_logits(2, compiler.vocab_size)
    masked = apply_grammar_masks(logits, [original, fork])
    assert {smollm2.tokenizer.decode([t]) for t in allowed_ids(masked[0])} == {"a", "b", "c"}
    assert {smollm2.tokenizer.decode([t]) for t in allowed_ids(masked[1])} == set("0123456789")
    original.accept(ids("c")[0])  # the original is still one letter in
    fork.accept(ids("5")[0])
    assert fork.is_terminated and not original.is_terminated


@pytest.mark.slow
def test_the_cache_returns_the_compiled_grammar_and_keeps_at_most_max_cached(smollm2):
    compiler = GrammarCompiler(smollm2.tokenizer, smollm2.arch.vocab_size, smollm2.eos_token_ids, max_cached=3)
    specs = [StructuredOutput("regex", f"{letter}[0-9]") for letter in "abcde"]
    first = compiler.compile(specs[0])
    assert compiler.compile(specs[0]) is first
    kept = [compiler.compile(spec) for spec in specs[1:3]]
    compiler.compile(specs[0])  # most recently used now, so specs[1] is the one to go
    compiler.compile(specs[3])
    assert compiler.num_cached == 3
    assert compiler.compile(specs[0]) is first and compiler.compile(specs[2]) is kept[1]
    assert compiler.compile(specs[1]) is not kept[0]  # evicted, so compiled again
    compiler.compile(specs[4])
    assert compiler.num_cached == 3


@pytest.mark.slow
def test_compile_from_many_threads_at_once(compiler, smollm2):
    specs = [StructuredOutput("regex", f"t{i}[0-9]{{2}}") for i in range(6)] + [
        StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                                    "required": [f"k{i}"]})) for i in range(6)]
    work = specs * 3  # identical specs in flight at once share one compile
    start = threading.Barrier(len(work))

    def compile_one(spec):
        start.wait()
        return compiler.compile(spec)

    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(compile_one, work))
    by_spec = {}
    for spec, compiled in zip(work, results):
        assert by_spec.setdefault(spec, compiled) is compiled
    matchers = [compiler.matcher(by_spec[spec]) for spec in specs]
    masked = apply_grammar_masks(random_logits(len(specs), compiler.vocab_size), matchers)
    for i in range(6):
        assert smollm2.tokenizer.decode(allowed_ids(masked[i])[:1]).startswith("t")
        assert {smollm2.tokenizer.decode([t]) for t in allowed_ids(masked[6 + i])} <= {"{", '{"'}
