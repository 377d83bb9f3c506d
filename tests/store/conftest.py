"""Store-test fixtures on top of tests/conftest.py's `redis_url` and `redis_namespace`."""

import pytest
from redis_server import RedisServer, RedisServerMissing


@pytest.fixture
def restartable_redis(tmp_path):
    """A private, durable (appendonly, fsync always) redis-server the test may kill -9 and restart()."""
    try:
        server = RedisServer(tmp_path / "redis", durable=True).start()
    except RedisServerMissing as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()
