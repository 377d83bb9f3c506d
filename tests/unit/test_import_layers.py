"""The import contracts in pyproject.toml ([tool.importlinter]): the layering of docs/architecture.md,
clients free of the engine and torch, the server reaching into training only for its queue and spec,
and no import cycle inside any package. A broken contract fails with import-linter's report, which
names each offending import and its line."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"  # import-linter's console script (dev extra)
    result = subprocess.run([str(lint_imports), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"import contracts broken:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout, result.stdout  # the contracts really ran
