"""Low-priority worker threads for work that must never slow the step loop: uploads' decoding and
validation, PEFT conversion, quota reads and store writes.

On a machine whose cores the forward pass keeps busy (every CPU deployment, and the host side of a
GPU one), a thread at the default priority takes its share of the cores from torch's threads, and
every tenant's inter-token latency grows while one tenant uploads. Linux applies `nice` per thread,
so these threads run at a lower priority: the scheduler gives the step loop the cores first, and an
upload takes longer instead. Most of their work (safetensors parsing, torch casts and finiteness
checks, sha256, file writes) runs with the GIL released, so a descheduled low-priority thread
rarely holds the engine thread back on the GIL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKGROUND_NICENESS = 10  # CFS weight 110 against the step loop's 1024 when both want a core
NUM_BACKGROUND_THREADS = 2  # uploads in flight at once, past which they queue (each still bounded in size)


def _lower_priority() -> None:
    # Linux schedules threads, not processes: a thread id here sets that thread alone, and lowering
    # one's own priority needs no privilege. SCHED_IDLE runs only on a core nobody else wants, and
    # yields it at once when a torch thread wakes (a nice value still takes ms-long slices from
    # it, and every parallel op of the forward then waits for its slowest thread). Elsewhere, or if
    # refused, a higher nice value, or the default priority.
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS)


class BackgroundWorkers:
    def __init__(self, num_threads: int = NUM_BACKGROUND_THREADS):
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="prefixserve-background",
                                            initializer=_lower_priority)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a low-priority thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
