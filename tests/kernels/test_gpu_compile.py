"""Every Triton kernel compiles for H100 (sm_90) and A100 (sm_80) with the launchers' own
specializations, without spilling registers and within the shared memory a block may use. Needs no
GPU: gpu_compile.py compiles ahead of time with the ptxas Triton ships (see its docstring)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="needs Triton's NVIDIA backend (it ships ptxas), which is not installed")


@pytest.fixture(scope="module")
def report() -> dict:
    # A child process: this one runs the kernels interpreted (TRITON_INTERPRET, set in conftest).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_launched_kernel_compiles_for_both_targets(report):
    compiled = {(k["kernel"], k["target"]) for k in report["kernels"]}
    expected = {(name, target) for name in report["launched_kernels"] for target in ("sm_90", "sm_80")}
    assert len(report["launched_kernels"]) == 7 and compiled == expected


def test_no_kernel_spills_registers(report):
    spilling = [(k["target"], k["kernel"], k["case"], k["registers"], k["spill_bytes"], k["stack_bytes"])
                for k in report["kernels"] if k["spill_bytes"] or k["stack_bytes"]]
    assert not spilling, f"expected no spills, found (target, kernel, case, registers, local, stack) {spilling}"


def test_shared_memory_fits_one_block(report):
    over = [(k["target"], k["kernel"], k["case"], k["shared_bytes"]) for k in report["kernels"]
            if k["shared_bytes"] > k["max_shared_bytes"]]
    assert not over, f"expected shared memory within the per-block limit, found {over}"
