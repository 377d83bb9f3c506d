"""Compare the installed distributions with requirements.lock.

`make install` runs it with --strict: a package installed at another version than the lock pins (or
one the lock does not know) fails the install, so a venv never passes for locked when it is not.
`make test-latest` runs it without: it lists what the newest allowed versions changed, above the
test results, so a failure can be traced to the upgrade that caused it.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

from packaging.utils import canonicalize_name
from packaging.version import Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")
NOT_LOCKED = {"prefixserve"}  # the project itself, installed editable from the working tree


def locked(path: str) -> dict[str, Version]:
    pins = {}
    with open(path) as f:
        for line in f:
            match = PIN.match(line.strip())
            if match:
                pins[canonicalize_name(match[1])] = Version(match[2])
    if not pins:
        raise SystemExit(f"expected pins of the form name==version in {path}, found none")
    return pins


def installed() -> dict[str, Version]:
    return {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}


def drift(pins: dict[str, Version], have: dict[str, Version]) -> list[tuple[str, str, str]]:
    """(package, locked, installed) for every installed package whose version is not the locked one.
    A local build label is not a difference: 2.13.0+cpu is the locked torch==2.13.0, built for the CPU."""
    rows = []
    for name, version in sorted(have.items()):
        if name in NOT_LOCKED:
            continue
        pin = pins.get(name)
        if pin is None:
            rows.append((name, "(not in the lock)", str(version)))
        elif Version(version.public) != pin:
            rows.append((name, str(pin), str(version)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any difference")
    args = parser.parse_args()
    rows = drift(locked(args.lock), installed())
    if not rows:
        print(f"every installed package is at the version {args.lock} pins")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{len(rows)} installed package(s) differ from {args.lock}:")
    for name, pin, version in rows:
        print(f"  {name:<{width}}  locked {pin:<18}  installed {version}")
    if args.strict:
        print("the venv does not match the lock: `make clean install` rebuilds it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
