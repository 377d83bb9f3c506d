"""schemathesis against the app's own /openapi.json: for every operation, generated requests (valid
and invalid) must never get a 5xx, and every response must be documented there: its status code, its
content type, and its body's schema (errors in their one `{"error": ...}` shape, streamed events
each checked against the documented chunk).

In-process over ASGI on a tiny random-weight backbone, so generation is cheap; a small KV pool
makes large `max_tokens` values come back as a 400 rather than long generations. Derandomized, so
a CI failure reproduces locally with the same examples."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.models.tiny import tiny_backbone, tiny_hf_model
from prefixserve.server.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Per operation and mode. Derandomized and without an example database: what CI sees, a local run sees.
FUZZ = settings(max_examples=30, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

@pytest.fixture(scope="module")
def chatty_tiny_backbone(smollm2_dir):
    """The tiny random-weight Llama with SmolLM2's vocabulary, tokenizer and chat template, so text
    prompts, chat messages, stop strings and token texts all take their real paths."""
    from transformers import AutoTokenizer

    return tiny_backbone(tiny_hf_model(seed=0, vocab_size=49152), AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture(scope="module")
def app(chatty_tiny_backbone):
    # 8 pages of 16 tokens: a request that could outgrow 128 tokens of KV cache is refused with a 400.
    sync = LLMEngine(chatty_tiny_backbone, EngineConfig(cache=CacheConfig(page_size=16, num_pages=8),
                                                        scheduler=SchedulerConfig(max_num_seqs=4, max_waiting=4),
                                                        adapters=AdapterLimits(max_artifact_bytes=1 << 20)))
    engine = AsyncEngine(sync)
    yield create_app(engine, request_timeout_s=20)
    engine.shutdown()
    sync.close()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict({
        "request-timeout": 30,
        # 501 is the documented answer of what this app is not configured for (training jobs without
        # a queue); any other 5xx is a bug. Whether the operation documents 501 is status_code_conformance's.
        "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", "501"]}},
    }))


def fuzz(operation, mode: GenerationMode) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def requests_conform(case):
        case.call_and_validate(checks=CHECKS)

    requests_conform()


# schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) does not run under
# pytest 9 (it sets `Function._nodeid`, which pytest 9 removed), so the operations are walked here:
# one subtest per operation and mode, and a new route is covered without touching this file.
def test_every_operation_conforms_to_the_openapi_schema(api_schema, subtests):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        # Only a body can be invalid here: an operation without one (no parameters, or only a path
        # string) has no negative case, and Hypothesis would call that unsatisfiable.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        for mode in modes:
            with subtests.test(operation=operation.label, mode=mode.value):
                fuzz(operation, mode)
