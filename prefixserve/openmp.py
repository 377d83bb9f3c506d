"""OpenMP settings for a process whose model steps run on a thread of their own (the server, the training
worker), applied before torch loads libgomp, which reads them once, at load.

libgomp keeps one worker pool per thread that has run a parallel torch op. Once the pools hold more
threads than the machine has CPUs - as soon as the main thread has loaded the model and the engine
thread steps it - libgomp cuts the spin of every waiting worker from ~300,000 iterations to 1,000, so
each parallel op wakes its workers from a futex. Measured on a 2-core AMD EPYC (2026-12-08, torch 2.13
CPU): a [16, 4, 576] x [16, 576, 8] x [16, 8, 576] bmm pair took 210-240 us on a thread started after
the main thread had used OpenMP against 50-65 us on the main thread (benchmarks/openmp_threads.py); a
128-request 16-LoRA workload stepped on such a thread ran 0.76-0.77 of plain against 0.90-0.96 on the
main thread, and plain itself fell ~20 % (a scratch run, RESULTS.md 2026-12-08).

OMP_WAIT_POLICY=active with GOMP_SPINCOUNT=300000 gives every pool libgomp's unthrottled spin
(~300,000 iterations, then the worker sleeps, so an idle pool does not hold a core). Settings the user
exported are kept as they are."""

from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}


def apply_openmp_defaults() -> dict[str, str]:
    """Set DEFAULTS where the environment has no value, if torch has not been imported yet (after that
    libgomp has read its environment, as in a test process that imports the CLI); returns what was set."""
    if "torch" in sys.modules:
        return {}
    applied = {name: value for name, value in DEFAULTS.items() if name not in os.environ}
    os.environ.update(applied)
    return applied
