"""Shared by the benchmarks: machine description, the RESULTS.md appender, and the HTTP client side of
the benchmarks that run `prefixserve serve` as its own process (start it, stream a completion)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc = f"{torch.cuda.get_device_name()}; host {desc}"
    return desc


def append_results(title: str, lines: list[str]) -> None:
    """Append a dated section; earlier sections are never rewritten."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    stamp = datetime.date.today().isoformat()
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}\n\n" + "\n".join(lines) + "\n")


def layer_weights(model) -> list[torch.Tensor]:
    """Every weight matrix of the backbone's layers (our fused Llama), the LM head excluded."""
    return [w for layer in model.layers
            for w in (layer.qkv_proj.weight, layer.o_proj.weight, layer.gate_up_proj.weight, layer.down_proj.weight)]


@torch.inference_mode()
def matmul_seconds(weights: list[torch.Tensor], rows: int, iters: int, warmup: int = 1) -> float:
    """Seconds for one pass of `rows` random input rows through every weight (F.linear), nothing else:
    the floor the benchmarks compare against."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    sync = torch.cuda.synchronize if weights[0].is_cuda else (lambda: None)  # CUDA launches return at once
    for _ in range(warmup):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    sync()
    return (time.perf_counter() - start) / iters


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, store_dir: str, extra_args: list[str]) -> subprocess.Popen:
    """`prefixserve serve` on SmolLM2 with a local store in `store_dir`; returns once /health answers."""
    cmd = [sys.executable, "-m", "prefixserve.cli", "serve", "--port", str(port), "--store-dir", store_dir,
           *extra_args]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start within 180 s")


async def stream(client: httpx.AsyncClient, prompt: list[int], osl: int, stamps: list[float],
                 model: str = "base") -> None:
    """Stream one greedy completion of exactly `osl` tokens (ignore_eos); append the arrival time of
    each streamed token to `stamps`."""
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"stream refused: {resp.status_code} {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text") is not None:
                    stamps.append(time.monotonic())
