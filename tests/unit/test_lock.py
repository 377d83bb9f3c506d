"""requirements.lock covers what pyproject.toml asks for, inside its ranges, so a dependency added
without `make lock` fails here rather than on a user's fresh install; and the drift check that ends
`make install` tells a locked venv from one that is not."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from lock_drift import drift, locked  # noqa: E402

LOCK = ROOT / "requirements.lock"
LINUX_PY311 = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11"}


def requirements() -> list[Requirement]:
    """Everything `make install` asks pip for: the project's dependencies, its extras, requirements.in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    lines += [line.split("#")[0].strip() for line in (ROOT / "requirements.in").read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("prefixserve")]


@pytest.mark.parametrize("requirement", requirements(), ids=str)
def test_every_requirement_is_locked_within_its_range(requirement):
    if requirement.marker and not requirement.marker.evaluate(LINUX_PY311):
        pytest.skip("not installed on Linux / Python 3.11")
    pins = locked(str(LOCK))
    name = canonicalize_name(requirement.name)
    assert name in pins, f"expected {requirement.name} in requirements.lock, found none: run `make lock`"
    assert requirement.specifier.contains(pins[name], prereleases=True), \
        f"expected the locked {requirement.name}=={pins[name]} within {requirement}: run `make lock`"


def test_drift_ignores_a_local_build_label_and_names_every_other_difference():
    pins = {"torch": Version("2.13.0"), "transformers": Version("5.23.0"), "peft": Version("0.21.2")}
    have = {"torch": Version("2.13.0+cpu"), "transformers": Version("5.24.0"), "peft": Version("0.21.2"),
            "prefixserve": Version("0.1.0"), "left-over": Version("1.0")}
    assert drift(pins, have) == [("left-over", "(not in the lock)", "1.0"), ("transformers", "5.23.0", "5.24.0")]


def test_a_lock_without_pins_is_refused(tmp_path):
    empty = tmp_path / "empty.lock"
    empty.write_text("# nothing here\n")
    with pytest.raises(SystemExit, match="expected pins of the form name==version"):
        locked(str(empty))
