"""A private redis-server for tests, as plain functions and a class, so that any conftest can wrap them
in fixtures (tests/ is on sys.path): start on a free loopback port, wait for PING, kill -9, restart on
the same port and data directory. Tests never depend on a shared Redis's contents."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

from prefixserve.adapters_store.redis_store import redact_url

INSTALL_HINT = ("redis-server is not on PATH, and the Redis store tests need one: install it "
                "(`apt-get install redis-server`, or `brew install redis`), or set REDIS_URL to a Redis "
                "the tests may write to (they use their own key namespaces and remove them afterwards)")


class RedisServerMissing(RuntimeError):
    pass


class RedisServer:
    """One redis-server process on 127.0.0.1. `durable=True` turns on the append-only file with an
    fsync per write, so every acknowledged write survives kill -9 and a restart on the same data_dir."""

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = False):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerMissing(INSTALL_HINT)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.durable = durable
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                 "--dir", str(self.data_dir), "--protected-mode", "no", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._wait_ready(timeout_s)
        return self

    def kill(self) -> None:
        """kill -9: no shutdown, no final save (the outage a replica must survive)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"expected redis-server to listen on port {self.port}, found it exited "
                                       f"with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the append-only file
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"expected redis-server on port {self.port} to answer PING within {timeout_s} s, "
                           f"found no answer:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 2000) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace")[-num_chars:] if path.exists() else "<no log>"


def free_port() -> int:
    """A port that was free a moment ago (a race with other processes is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis_server(data_dir: Path, *, durable: bool = False) -> RedisServer:
    """Start a private server; retries on another port if the chosen one was taken meanwhile."""
    for attempt in range(3):
        try:
            return RedisServer(data_dir, durable=durable).start()
        except RedisServerMissing:
            raise
        except RuntimeError:
            if attempt == 2:
                raise
    raise RuntimeError("unreachable")


def redis_url_from_env_or_start(data_dir: Path) -> tuple[str, RedisServer | None]:
    """REDIS_URL if set (nothing to stop), else a private non-durable server (stop it afterwards)."""
    if os.environ.get("REDIS_URL"):
        url = os.environ["REDIS_URL"]
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        except redis.RedisError as e:
            raise RuntimeError(f"expected REDIS_URL={redact_url(url)} to answer PING, "
                               f"found {type(e).__name__}: {e}") from None
        finally:
            client.close()
        return url, None
    server = start_redis_server(data_dir)
    return server.url, server


def unique_namespace(label: str = "test") -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def delete_namespace(url: str, namespace: str) -> None:
    """Remove every key of a namespace (SCAN, never KEYS), so a shared REDIS_URL stays clean."""
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        for batch in _batches(client.scan_iter(match=f"{_glob_escape(namespace)}:*", count=1000), 500):
            client.delete(*batch)
    finally:
        client.close()


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
