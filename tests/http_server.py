"""The real app under uvicorn on a loopback port, for HTTP tests (tests/ is on sys.path)."""

import contextlib
import socket
import threading
import time

import uvicorn

from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig
from prefixserve.engine.async_engine import AsyncEngine
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.server.app import create_app


class Served(tuple):
    """(base_url, sync engine), with the app as `.app` for tests that look at its state."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(backbone, engine_config: EngineConfig | None = None, store=None, **app_options):
    """The real app under uvicorn on a loopback port; yields (base_url, sync engine)."""
    sync = LLMEngine(backbone, engine_config or EngineConfig(
        cache=CacheConfig(num_pages=128), scheduler=SchedulerConfig(max_num_seqs=8, max_waiting=4),
        adapters=AdapterLimits(max_artifact_bytes=8 << 20)), store)
    engine = AsyncEngine(sync)
    port = free_port()
    app = create_app(engine, **app_options)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        served = Served((f"http://127.0.0.1:{port}", sync))
        served.app = app
        yield served
    finally:
        srv.should_exit = True
        thread.join(10)
        engine.shutdown()
        sync.close()
