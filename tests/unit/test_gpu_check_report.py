"""`make gpu-check` folds its steps into one JSON: each step's exit code and last JSON line, and a
failed step fails the whole check with its stderr tail (so a broken GPU run cannot read as green)."""

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).parents[2] / "scripts" / "gpu_check_report.py"


def write_step(logs: Path, name: str, rc: int, out: str, err: str = "") -> None:
    (logs / f"{name}.out").write_text(out)
    (logs / f"{name}.err").write_text(err)
    (logs / f"{name}.rc").write_text(f"{rc}\n")


def report(logs: Path, out_file: Path) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, str(REPORT), str(logs), str(out_file)], capture_output=True, text=True)
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out_file.read_text()) == printed
    return done.returncode, printed


def test_steps_fold_into_one_json(tmp_path):
    write_step(tmp_path, "cuda_tests", 0, "....\n4 passed in 3.1s\n")
    write_step(tmp_path, "serving", 0, "progress\n" + json.dumps({"benchmark": "serving", "tok_s": 900.0}) + "\n")
    rc, result = report(tmp_path, tmp_path / "gpu_check.json")
    assert rc == 0 and result["ok"]
    assert result["steps"]["cuda_tests"] == {"rc": 0, "summary": "4 passed in 3.1s"}
    assert result["steps"]["serving"]["result"] == {"benchmark": "serving", "tok_s": 900.0}


def test_a_failed_step_fails_the_check_with_its_stderr(tmp_path):
    write_step(tmp_path, "cuda_tests", 0, "1 passed\n")
    write_step(tmp_path, "kernels", 124, "no json here\n", err="Traceback ...\nTimeoutError\n")
    rc, result = report(tmp_path, tmp_path / "gpu_check.json")
    assert rc == 1 and not result["ok"]
    assert result["steps"]["kernels"]["result"] is None
    assert "TimeoutError" in result["steps"]["kernels"]["stderr_tail"]
