"""A request body that arrives too slowly (a stalled upload, a slow-loris client) is dropped with a 408
after the grace period, over real HTTP, and the server goes on serving everyone else; a body that
keeps coming at the minimum rate is read in full, however long it takes."""

import json
import select
import socket
import time

import httpx
import pytest
from http_server import serving

GRACE_S, MIN_RATE = 0.5, 2000.0


@pytest.fixture(scope="module")
def server(smollm2):
    with serving(smollm2, min_body_bytes_per_s=MIN_RATE, body_grace_s=GRACE_S) as running:
        yield running


def send_slowly(base_url: str, head: bytes, chunks: list[bytes], pause_s: float) -> tuple[int, dict, float]:
    """Send the request head, then each chunk after `pause_s`, stopping early if the server answers;
    return (status, JSON body, seconds until the answer began)."""
    host, port = base_url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], pause_s)[0]:
                break  # the server answered while the body was still coming
            try:
                sock.sendall(chunk)
            except OSError:
                break
        select.select([sock], [], [], 30)
        elapsed = time.monotonic() - start
        response = b""
        while b"\r\n\r\n" not in response or len(response.partition(b"\r\n\r\n")[2]) < content_length(response):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    status = int(response.split(b" ", 2)[1])
    return status, json.loads(response.partition(b"\r\n\r\n")[2] or b"{}"), elapsed


def content_length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def json_head(path: str, body_len: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_len}\r\n\r\n").encode()


def test_a_stalled_body_is_a_408_and_others_are_served_meanwhile(server):
    base_url, sync = server
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 2}).encode()
    # 5 bytes, then nothing for much longer than the grace period.
    status, error, elapsed = send_slowly(base_url, json_head("/v1/generate", len(body)) + body[:5], [body[5:]],
                                         pause_s=GRACE_S * 20)
    assert status == 408, error
    assert error["error"]["type"] == "body_too_slow"
    assert "2000 bytes/s" in error["error"]["message"] and "5 bytes" in error["error"]["message"]
    assert GRACE_S <= elapsed < GRACE_S * 10  # dropped soon after the grace period, not when the client gave up
    with httpx.Client(base_url=base_url, timeout=30) as client:
        r = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 2})
        assert r.status_code == 200, r.text


def test_a_slow_loris_upload_is_dropped_and_nothing_is_stored(server):
    base_url, sync = server
    boundary = "b0undary"
    payload = b"x" * 4000
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    head = (f"PUT /v1/tasks/slow HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    # 100 bytes every 0.2 s is 500 bytes/s: under the minimum, however long the client keeps it up.
    chunks = [body[i:i + 100] for i in range(0, len(body), 100)]
    status, error, elapsed = send_slowly(base_url, head, chunks, pause_s=0.2)
    assert status == 408, error
    assert error["error"]["type"] == "body_too_slow"
    assert elapsed < len(chunks) * 0.2  # dropped before the client was done
    assert sync.store.current("default/slow") is None


def test_a_body_at_the_minimum_rate_is_read_in_full(server):
    base_url, _ = server
    # JSON may carry any amount of whitespace: 4,000 bytes that take well past the grace period to send.
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 2, "temperature": 0}).encode() + b" " * 4000
    # 400 bytes every 0.15 s is 2,667 bytes/s: above the minimum all the way.
    chunks = [body[i:i + 400] for i in range(0, len(body), 400)]
    status, out, elapsed = send_slowly(base_url, json_head("/v1/generate", len(body)), chunks, pause_s=0.15)
    assert status == 200, out
    assert len(out["token_ids"]) == 2 and elapsed > GRACE_S
