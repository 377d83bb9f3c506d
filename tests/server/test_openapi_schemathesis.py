"""schemathesis against the app's own /openapi.json: for every operation, generated requests (valid
and invalid) must never get a 5xx, and every response must be documented there: its status code, its
content type, and its body's schema (errors in their one `{"error": ...}` shape, streamed events
each checked against the documented chunk).

Two apps: one as `make serve` runs it (no API keys, no job queue: the training routes answer 501), and
one with API keys on over a tenant registry and a SQLite job queue, where every request carries a valid
key (the admin key for /v1/admin and /metrics, a tenant's for the rest), so every route runs past its
401 and the training routes queue real jobs.

In-process over ASGI on a tiny random-weight backbone, so generation is cheap; a small KV pool
makes large `max_tokens` values come back as a 400 rather than long generations. Derandomized, so
a CI failure reproduces locally with the same examples."""

import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable

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
from prefixserve.server.auth import Authenticator
from prefixserve.server.tenants import FileTenantRegistry
from prefixserve.training.sqlite_queue import SqliteJobQueue

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


@contextlib.contextmanager
def tiny_engine(backbone):
    # 8 pages of 16 tokens: a request that could outgrow 128 tokens of KV cache is refused with a 400.
    sync = LLMEngine(backbone, EngineConfig(cache=CacheConfig(page_size=16, num_pages=8),
                                            scheduler=SchedulerConfig(max_num_seqs=4, max_waiting=4),
                                            adapters=AdapterLimits(max_artifact_bytes=1 << 20)))
    engine = AsyncEngine(sync)
    try:
        yield engine
    finally:
        engine.shutdown()
        sync.close()


@pytest.fixture(scope="module")
def app(chatty_tiny_backbone):
    with tiny_engine(chatty_tiny_backbone) as engine:
        yield create_app(engine, request_timeout_s=20)


ADMIN_KEY = "schemathesis-admin-key"
TENANT = "schemathesis-tenant"  # a name the admin routes' generated names will not hit (and delete)


@pytest.fixture(scope="module")
def keyed_app(chatty_tiny_backbone, tmp_path_factory):
    """The app with API keys on and a job queue; yields it, the tenant's key and the queue."""
    folder = tmp_path_factory.mktemp("keyed")
    registry = FileTenantRegistry(folder / "tenants.json")
    registry.create(TENANT)
    tenant_key = registry.add_key(TENANT)[1]
    queue = SqliteJobQueue(folder / "jobs.sqlite3")
    with tiny_engine(chatty_tiny_backbone) as engine:
        yield create_app(engine, request_timeout_s=20, auth=Authenticator(registry, ADMIN_KEY), job_queue=queue), \
            tenant_key, queue
    queue.close()


def load_schema(app, expected_statuses: list[str]):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict({
        "request-timeout": 30,
        "checks": {"not_a_server_error": {"expected-statuses": expected_statuses}},
    }))


@pytest.fixture(scope="module")
def api_schema(app):
    # 501 is the documented answer of what this app is not configured for (training jobs without
    # a queue); any other 5xx is a bug. Whether the operation documents 501 is status_code_conformance's.
    return load_schema(app, ["2XX", "3XX", "4XX", "501"])


@pytest.fixture(scope="module")
def keyed_schema(keyed_app):
    # Configured for everything, and never overloaded by one request at a time: no 5xx at all.
    return load_schema(keyed_app[0], ["2XX", "3XX", "4XX"])


def fuzz(operation, mode: GenerationMode, headers: dict[str, str], statuses: Counter) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def requests_conform(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses[response.status_code] += 1

    requests_conform()


# schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) does not run under
# pytest 9 (it sets `Function._nodeid`, which pytest 9 removed), so the operations are walked here:
# one subtest per operation and mode, and a new route is covered without touching this file.
def fuzz_every_operation(api_schema, subtests, headers_for: Callable[[str], dict[str, str]]) -> dict[str, Counter]:
    """The status codes each operation answered, by label ("POST /v1/training/jobs")."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    statuses = defaultdict(Counter)
    for operation in operations:
        # Only a body can be invalid here: an operation without one (no parameters, or only a path
        # string) has no negative case, and Hypothesis would call that unsatisfiable.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        for mode in modes:
            with subtests.test(operation=operation.label, mode=mode.value):
                fuzz(operation, mode, headers_for(operation.path), statuses[operation.label])
    return statuses


def test_every_operation_conforms_to_the_openapi_schema(api_schema, subtests):
    fuzz_every_operation(api_schema, subtests, lambda path: {})


def test_every_operation_conforms_with_api_keys_on_and_a_job_queue(keyed_schema, keyed_app, subtests):
    _, tenant_key, queue = keyed_app

    def headers_for(path: str) -> dict[str, str]:
        admin = path.startswith("/v1/admin") or path == "/metrics"
        return {"Authorization": f"Bearer {ADMIN_KEY if admin else tenant_key}"}

    statuses = fuzz_every_operation(keyed_schema, subtests, headers_for)
    # Every request got past authentication, with the key its route takes (the other kind is a 403).
    assert not {label: seen for label, seen in statuses.items() if seen.keys() & {401, 403}}, statuses
    # The training routes ran for real: generated specs were queued, up to the tenant's cap.
    assert statuses["POST /v1/training/jobs"][201] >= 1 and queue.list_jobs(TENANT), statuses["POST /v1/training/jobs"]
