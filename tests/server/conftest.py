import httpx
import openai
import pytest
from http_server import serving


@pytest.fixture(scope="module")
def server(smollm2):
    with serving(smollm2) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    """The unmodified openai client on whichever `server` the module serves. No retries: a refused
    request must surface at once, not after the client's backoff."""
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(server):
    return server[1].backbone.tokenizer
