import pytest
from http_server import serving


@pytest.fixture(scope="module")
def server(smollm2):
    """The real app under uvicorn on loopback; yields (base_url, sync engine)."""
    with serving(smollm2) as running:
        yield running
