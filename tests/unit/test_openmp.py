"""The CLI sets libgomp's wait policy before torch loads it (prefixserve/openmp.py), checked through
libgomp's own report of the settings it read (OMP_DISPLAY_ENV), in fresh processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from prefixserve.openmp import DEFAULTS, apply_openmp_defaults


def libgomp_settings(overrides: dict[str, str]) -> dict[str, str]:
    """What libgomp read, in a fresh process that imports the CLI and then runs a parallel torch op."""
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    env.update(overrides, OMP_DISPLAY_ENV="VERBOSE")
    done = subprocess.run([sys.executable, "-c", "import prefixserve.cli, torch; torch.ones(1 << 18).sum()"],
                          env=env, capture_output=True, text=True, timeout=300, check=True)
    settings = dict(re.findall(r"^\s+(\w+) = '([^']*)'", done.stderr, re.MULTILINE))
    assert "OMP_WAIT_POLICY" in settings, f"libgomp printed no settings; stderr: {done.stderr[-2000:]}"
    return settings


def test_the_cli_sets_the_wait_policy_before_torch_loads_libgomp():
    settings = libgomp_settings({})
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE"
    assert settings["GOMP_SPINCOUNT"] == "300000"


def test_settings_the_user_exported_are_kept():
    settings = libgomp_settings({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"})
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["GOMP_SPINCOUNT"] == "1000"


def test_after_torch_is_imported_nothing_is_set(monkeypatch):
    import torch  # noqa: F401  (this process has it already; the point is that the call sees it)

    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    assert apply_openmp_defaults() == {}
    assert not any(name in os.environ for name in DEFAULTS)
