import httpx
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
