"""Fold gpu_check.sh's step logs into one JSON object: per step its exit code, its last JSON line
(every benchmark prints one last), and for the tests pytest's summary line; the tail of stderr for a
step that failed. Usage: gpu_check_report.py LOG_DIR [OUT_FILE]. Exits 1 if any step failed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def step_report(logs: Path, name: str) -> dict:
    rc = int((logs / f"{name}.rc").read_text())
    out = (logs / f"{name}.out").read_text(errors="replace")
    report: dict = {"rc": rc}
    if name == "cuda_tests":
        lines = out.strip().splitlines()
        report["summary"] = lines[-1] if lines else ""
    else:
        report["result"] = last_json(out)
    if rc != 0:
        report["stderr_tail"] = (logs / f"{name}.err").read_text(errors="replace")[-2000:]
    return report


def main() -> int:
    logs = Path(sys.argv[1])
    names = [p.stem for p in sorted(logs.glob("*.rc"), key=lambda p: p.stat().st_mtime)]
    steps = {name: step_report(logs, name) for name in names}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result = {"benchmark": "gpu_check", "device": device, "torch": torch.__version__,
              "ok": all(s["rc"] == 0 for s in steps.values()), "steps": steps}
    text = json.dumps(result)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
