"""Shared by the benchmarks: machine description and the RESULTS.md appender."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

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
